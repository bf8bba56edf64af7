"""How the benchmarks report: each result row printed as one JSON line and appended to a
results file (benchmarks/results/*.jsonl keeps every run, so runs can be compared later), with
the commit it measured so rows of different code states are not mixed up."""

import functools
import json
import os
import subprocess


@functools.cache
def commit() -> str:
    """HEAD's short hash, "+changes" when the tree differs from it; "unknown" outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def emit(rows: list[dict], path: str) -> None:
    """Prints each row as a JSON line and appends them to `path` (its folder created)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            line = json.dumps({**row, "commit": row.get("commit", commit())})
            print(line)
            f.write(line + "\n")

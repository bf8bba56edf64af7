"""How the benchmarks report: each result row printed as one JSON line and appended to a
results file (benchmarks/results/*.jsonl keeps every run, so runs can be compared later)."""

import json
import os


def emit(rows: list[dict], path: str) -> None:
    """Prints each row as a JSON line and appends them to `path` (its folder created)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            line = json.dumps(row)
            print(line)
            f.write(line + "\n")

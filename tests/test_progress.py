"""Progress lines: a redrawn bar on a terminal, a log line per tenth elsewhere."""

import io

from larvseg_jax import progress as progress_lib
from larvseg_jax.progress import Progress, format_seconds


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_format_seconds():
    assert [format_seconds(s) for s in (4.2, 65, 3725)] == ["4s", "1m05s", "1h02m05s"]


def test_bar_on_a_terminal_ends_with_one_newline():
    stream = Terminal()
    progress = Progress("eval step 5", 3, stream=stream)
    for _ in range(3):
        progress.advance()
    progress.close()
    text = stream.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and text.count("\n") == 1
    assert "[########################] eval step 5: 3/3 images (100%)" in text
    assert "images/s" in text


def test_log_lines_every_tenth_without_a_terminal(monkeypatch):
    lines = []
    monkeypatch.setattr(progress_lib.logging, "info", lambda fmt, *a: lines.append(fmt % a))
    plain = io.StringIO()
    progress = Progress("wa150", 30, stream=plain)
    for _ in range(30):
        progress.advance()
    progress.close()
    assert plain.getvalue() == "" and len(lines) == 10
    assert lines[0].startswith("wa150: 3/30 images (10%)") and "ETA" in lines[0]
    assert lines[-1].startswith("wa150: 30/30 images (100%)") and "ETA" not in lines[-1]


def test_disabled_progress_is_silent_but_counts(monkeypatch):
    lines = []
    monkeypatch.setattr(progress_lib.logging, "info", lambda fmt, *a: lines.append(fmt % a))
    stream = Terminal()
    progress = Progress("x", 10, enabled=False, stream=stream)
    progress.update(7)
    progress.close()
    assert progress.done == 7 and stream.getvalue() == "" and not lines

"""Progress with rate and ETA for long loops: a redrawn bar on a terminal, log lines elsewhere.

Long work (dataset conversion, evaluation) reports how far it is and when it will end; in a
terminal one line is redrawn in place, in a log file (CI, a cluster job) a line is written about
every `log_fraction` of the total, so logs stay short.
"""

import sys
import time
from typing import TextIO

from absl import logging


def format_seconds(seconds: float) -> str:
    """3725 -> "1h02m05s", 65 -> "1m05s", 4.2 -> "4s"."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts units of work done out of `total` and reports rate and ETA.

    Args:
      label: what is being done, e.g. "wa150 train".
      total: units expected (None = unknown: no ETA).
      unit: the unit's name in the report, e.g. "images".
      stream: where a terminal bar is drawn (default stderr).
      log_fraction: without a terminal, log about every this fraction of the total.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "images",
        *,
        stream: TextIO | None = None,
        log_fraction: float = 0.1,
        min_interval_s: float = 0.5,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every = max(1, int(total * log_fraction)) if total else 1000
        self.min_interval_s = min_interval_s
        self.start = time.perf_counter()
        self.done = 0
        self._last_draw = 0.0
        self._last_logged = 0
        self.extra = ""

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self.label}: {self.done}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:.1f} {self.unit}/s, {format_seconds(elapsed)} elapsed"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {format_seconds((self.total - self.done) / rate)}"
        return text + (f", {self.extra}" if self.extra else "")

    def update(self, done: int, extra: str = "") -> None:
        """Sets the count of units done (absolute, so several workers can be summed)."""
        self.done, self.extra = done, extra
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw >= self.min_interval_s:
                self._last_draw = now
                self.stream.write("\r\033[K" + self.line())
                self.stream.flush()
        elif done - self._last_logged >= self.log_every:
            self._last_logged = done
            logging.info("%s", self.line())

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n, self.extra)

    def close(self) -> None:
        """Ends the bar with the final line (always logged, so logs show the total time)."""
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
        logging.info("%s", self.line())

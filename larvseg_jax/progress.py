"""Progress with rate and ETA for long loops: a redrawn bar on a terminal, log lines elsewhere.

Long work (dataset conversion, evaluation) says how far it is and when it will end. On a
terminal one line is redrawn in place (at most a few times a second); in a log file (CI, a
cluster job) a line is written about every tenth of the total, so logs stay short.
"""

import sys
import time
from typing import TextIO

from absl import logging


def format_seconds(seconds: float) -> str:
    """3725 -> "1h02m05s", 65 -> "1m05s", 4.2 -> "4s"."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts units of work done out of `total` and reports rate and ETA.

    Args:
      label: what is being done, e.g. "wa150" or "eval step 8000".
      total: units expected (None = unknown: no ETA, no bar).
      unit: the unit's name in the report.
      enabled: False = silent (the counts are still kept).
      stream: where a terminal bar is drawn (default stderr).
    """

    WIDTH = 24  # bar characters
    REDRAW_S = 0.2  # at most five redraws a second
    LOG_FRACTION = 0.1

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "images",
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
    ):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every = max(1, int(total * self.LOG_FRACTION)) if total else 1000
        self.start = time.perf_counter()
        self.done = 0
        self._drawn_at, self._drawn_done, self._logged_done = 0.0, 0, 0

    def line(self) -> str:
        """ "label: done/total unit (pct), rate unit/s, elapsed, ETA"."""
        elapsed = time.perf_counter() - self.start
        rate = self.done / max(elapsed, 1e-9)
        text = f"{self.label}: {self.done}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.done // self.total}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:.2f} {self.unit}/s, {format_seconds(elapsed)} elapsed"
        if self.total and self.done < self.total and self.done:
            text += f", ETA {format_seconds((self.total - self.done) / rate)}"
        return text

    def _bar(self) -> str:
        if not self.total:
            return self.line()
        full = self.WIDTH * min(self.done, self.total) // self.total
        return f"[{'#' * full}{'.' * (self.WIDTH - full)}] {self.line()}"

    def _draw(self) -> None:
        self.stream.write("\r\033[K" + self._bar())
        self.stream.flush()
        self._drawn_at, self._drawn_done = time.perf_counter(), self.done

    def update(self, done: int) -> None:
        """Sets the units done (absolute, so counts from several workers can be reported)."""
        self.done = done
        if not self.enabled:
            return
        if self.tty:
            if time.perf_counter() - self._drawn_at >= self.REDRAW_S or done == self.total:
                self._draw()
        elif done - self._logged_done >= self.log_every:
            self._logged_done = done
            logging.info("%s", self.line())

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def close(self) -> None:
        """Ends the bar's line so the next log line starts on its own."""
        if self.tty and self.done:
            if self._drawn_done != self.done:
                self._draw()
            self.stream.write("\n")
            self.stream.flush()

"""Helpers for tests that start `main.py` and signal it."""

import contextlib
import signal
import subprocess
import threading


@contextlib.contextmanager
def sigint_not_ignored():
    """Children started inside get SIGINT at its default. A shell runs background jobs with
    SIGINT ignored and children inherit that (main.py then rightly leaves it ignored), so a
    test run started with `&` would otherwise never see its Ctrl-C arrive. (A Python-level
    handler in this process becomes the default in an exec'd child.)"""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def read_until(proc: subprocess.Popen, text: str, timeout: float = 300) -> list[str]:
    """The output lines of `proc` up to the first holding `text`; kills the process if that
    line has not come after `timeout` seconds (a test must fail, not hang)."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if text in line:
                return lines
    finally:
        watchdog.cancel()
    raise AssertionError(f"{text!r} never came; last lines:\n{''.join(lines[-20:])}")

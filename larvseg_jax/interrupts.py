"""Ctrl-C and SIGTERM as requests to stop at the next safe point, not exceptions thrown into
whatever code happens to run.

Python's default SIGINT handler raises KeyboardInterrupt wherever the main thread is: inside an
XLA compilation, a grain iterator or an orbax write. That left half-initialised native state and
processes that crashed on the way out (exit 139). Here the first signal only sets a flag; each
phase checks it at its own safe points (every generated image, every train step boundary, every
evaluated image) with `check()`, which raises `StopRequested` there. A watcher thread woken by
the C-level handler (`signal.set_wakeup_fd`) prints at once what will happen, even while the
main thread is inside a long C++ call such as a compilation. A second signal exits at once
without saving anything more (checkpoints are committed by an atomic rename, so a save cut short
is never mistaken for a complete one).

Exit status of an interrupted run: 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
"""

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: int | None = None
_installed = False


class StopRequested(KeyboardInterrupt):
    """Raised by `check()` at a safe point after SIGINT or SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(error: BaseException | None = None) -> int:
    """128 + the signal that stopped the run (SIGINT when it was a plain KeyboardInterrupt)."""
    signum = getattr(error, "signum", None) or _requested or signal.SIGINT
    return 128 + int(signum)


def requested() -> int | None:
    """The signal number received, or None."""
    return _requested


def check() -> None:
    """Raises StopRequested if a stop was requested (call at safe points only)."""
    if _requested is not None:
        raise StopRequested(_requested)


def install() -> None:
    """Routes SIGINT and SIGTERM to the flag and the watcher (main thread, once per process).

    A signal the process was started with ignored (`nohup`, a background job of a script)
    stays ignored, as Python itself does for SIGINT.
    """
    global _installed
    if _installed:
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _on_signal)
    threading.Thread(target=_watch, args=(read_fd,), name="larvseg-interrupts", daemon=True).start()
    _installed = True


def _on_signal(signum, frame) -> None:
    """Python-level handler (runs between bytecodes of the main thread): sets the flag."""
    global _requested
    if _requested is None:
        _requested = signum


def _watch(read_fd: int) -> None:
    """Acts on the wakeup bytes at once, even while the main thread is in a C++ call."""
    global _requested
    received = 0
    while True:
        for signum in os.read(read_fd, 64):
            if signum not in SIGNALS:
                continue
            name = signal.Signals(signum).name
            received += 1
            if received == 1:
                _requested = _requested or signum
                _say(
                    f"{name} received: stopping at the next safe point (after the step, image or "
                    "compilation in progress) and saving what can be saved; send it again to "
                    "exit at once without saving"
                )
            else:
                _say(f"{name} received again: exiting now; nothing more is saved")
                os._exit(128 + signum)


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# Test hook (tests/test_interrupt_phases.py): "<point>[:<SIGNAL>]" makes the process send the
# signal (default SIGINT) to its own process group, as a terminal's Ctrl-C does, when it reaches
# that point ("generate", "compile", "save", "eval"), so each phase's handling is tested
# deterministically. Never set in normal use.
SIGNAL_AT_ENV = "LARVSEG_TEST_SIGNAL_AT"


def test_point(name: str) -> None:
    """Sends the test's signal if SIGNAL_AT_ENV names this point (first time only)."""
    point, _, signame = os.environ.get(SIGNAL_AT_ENV, "").partition(":")
    if point == name:
        del os.environ[SIGNAL_AT_ENV]
        os.killpg(os.getpgrp(), signal.Signals[signame or "SIGINT"])

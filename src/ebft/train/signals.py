"""SIGINT / SIGTERM during training: finish the step, save a checkpoint, stop."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager


@contextmanager
def stop_on_signals():
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second exits at once."""
    requested: list[int] = []

    def handler(signum, _frame):
        if requested:
            sys.stderr.write("second signal: exiting now without saving\n")
            sys.stderr.flush()
            import os

            os._exit(128 + signum)
        requested.append(signum)
        sys.stderr.write("stopping after this step; a checkpoint will be saved (signal again to exit at once)\n")

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signal handling to the caller
        previous = {}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

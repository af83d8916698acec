"""Signals: a clean stop in every phase of every command, and a graceful one inside the training loop.

``raise_on_signals`` (around a whole CLI command): SIGTERM raises ``Stopped`` as SIGINT raises
KeyboardInterrupt, so ``finally`` blocks run (the code sandbox is killed with everything it started, the
output folder's lock is released) and the command ends with one line and 128 + the signal's number.

``stop_on_signals`` (around the training loop): the first SIGINT/SIGTERM asks the loop to stop after the
current step and save a checkpoint; a second exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class Stopped(BaseException):
    """A SIGTERM (or another stop signal) outside the training loop. Like KeyboardInterrupt it is not an
    Exception, so no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def raise_on_signals():
    """SIGTERM raises ``Stopped`` inside the block (SIGINT keeps raising KeyboardInterrupt)."""

    def handler(signum, _frame):
        raise Stopped(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signal handling to the caller
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second exits at once."""
    requested: list[int] = []

    def handler(signum, _frame):
        if requested:
            sys.stderr.write("second signal: exiting now without saving\n")
            sys.stderr.flush()
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

"""One run per output folder: an exclusive ``flock`` on ``output_dir/.ebft.lock`` for the whole run.

The kernel releases the lock when the process ends, however it ends (a crash, SIGKILL), so a stale lock
cannot block the folder; the file itself stays and names the last holder. Under several processes only
the main one takes the lock (the others write nothing the main process has not planned), and all of
them learn whether it got it, so that a refused run stops everywhere at once. ``flock`` holds across
processes of one machine and on local file systems; on a network file system it depends on the server.

Once the folder is locked, what a run stopped while saving left behind (``checkpoint-N.tmp``) is
removed: no other run can be writing it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import socket
from pathlib import Path

from ebft.errors import ConfigError
from ebft.train import distributed

log = logging.getLogger("ebft")

LOCK_FILE = ".ebft.lock"
_LEFTOVER = re.compile(r"^checkpoint-\d+\.tmp$")


class OutputLock:
    """A held lock (or, on the processes other than the main one, a placeholder); ``release`` it at the end
    of the run. Dropping the object releases it too (its file closes)."""

    def __init__(self, handle=None):
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None


def acquire(output_dir: Path) -> OutputLock:
    """Lock ``output_dir`` (created if needed) for this process, or raise ConfigError naming the holder."""
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 (held for the whole run)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not written its PID yet"
        handle.close()
        raise ConfigError(
            f"output_dir: {output_dir} is in use by another ebft run ({holder}); wait for it to finish, "
            "or choose another output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return OutputLock(handle)


def remove_leftovers(output_dir: Path) -> list[str]:
    """Delete the partial checkpoint folders of a run stopped while saving; their names."""
    removed = []
    for path in sorted(output_dir.iterdir()):
        if _LEFTOVER.match(path.name) and path.is_dir():
            shutil.rmtree(path)
            removed.append(path.name)
    return removed


def lock_output_dir(output_dir: Path, accelerator) -> OutputLock:
    """The main process locks ``output_dir`` and clears leftovers; every process raises if it could not."""
    lock, message = OutputLock(), None
    if accelerator.is_main_process:
        try:
            lock = acquire(output_dir)
        except ConfigError as exc:
            message = str(exc)
        except OSError as exc:
            message = f"output_dir: cannot create or lock {output_dir} ({exc.strerror or exc})"
    message = distributed.first_error(accelerator, message)
    if message is not None:
        lock.release()
        raise ConfigError(message)
    if lock.held and (removed := remove_leftovers(output_dir)):
        log.info("removed %s, left by a run that was stopped while saving", ", ".join(removed))
    return lock

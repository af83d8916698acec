"""Helpers of the sandbox tests: finding processes by a marker in their command line, running the sandbox
from a separate host process (the role `ebft evaluate` plays)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap is not installed (.ci/run installs it: apt-get install bubblewrap)",
)


def marked_processes(marker: str) -> list[int]:
    """PIDs of this machine's processes whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry))
    return found


def wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def kill_all(pids: list[int]) -> None:
    """Clean up after a test that failed: the processes an attack left behind."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def daemon_code(marker: str) -> str:
    """Code that leaves a process behind: fork, setsid, fork, and the grandchild sleeps 30 s under a
    command line that holds ``marker`` (written reversed in the code, so that only the grandchild's command
    line holds it, not one that carries the code)."""
    return f"""
import os, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)", "{marker[::-1]}"[::-1]])
    os._exit(0)
"""


def start_evaluator(code: str, timeout: float, env: dict | None = None) -> subprocess.Popen:
    """A separate Python process (with ``env`` added to its environment) that runs ``code`` in the sandbox
    and prints the result as JSON: status and stdout."""
    script = (
        "import json, sys\nfrom ebft.evaluate.sandbox import run_code\n"
        f"result = run_code(sys.argv[1], timeout={timeout})\n"
        "print(json.dumps({'status': result.status, 'stdout': result.stdout}), flush=True)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script, code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {}), "PYTHONPATH": SRC},
    )

"""Run untrusted code and its unit tests in a separate Python process (for pass@k on code rows).

Each run gets: a fresh interpreter in isolated mode (``python -I``: no user site, no PYTHON* variables,
no script folder on ``sys.path``), an empty scratch folder as working directory and HOME, a wall-clock
timeout that kills the whole process group, resource limits set before exec (address space, CPU
seconds, file size, no core dumps), and no network:

* ``namespace`` isolation: the process runs in a new, empty network namespace (``unshare -n``, or
  ``unshare -r -n`` through a user namespace when not root). Nothing, not even loopback, is reachable.
* ``hooks`` isolation, where namespaces are unavailable: an audit hook (PEP 578, which code cannot
  remove) refuses every socket operation and the start of new programs (which would not inherit the
  hook), plus ctypes symbol lookups (a way around both).

``auto`` picks ``namespace`` when it works on this machine, else ``hooks``. The hooks are a guard
against accidents in model-written code, not a security boundary against a determined attacker.

Outcome: ``pass`` (the code and tests ran to the end), ``fail`` (an AssertionError), ``timeout``,
or ``error`` (any other exception, a syntax error, running out of memory, an early exit).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["pass", "fail", "timeout", "error"]
Isolation = Literal["auto", "namespace", "hooks"]

# Exit status of the runner when the program raised AssertionError (any other failure exits 1).
FAIL_EXIT = 3
# Largest file (stdout and stderr included) the program may write, in bytes.
FILE_LIMIT = 16 * 2**20
# Characters of stdout / stderr kept in the result (the end, where tracebacks are).
KEEP_CHARS = 4000

# Audit events refused in ``hooks`` mode: every socket.* event, starting other programs, and ctypes
# symbol lookups (calling libc's socket() directly).
_GUARD = """
import sys
def _ebft_guard(event, args):
    if event.startswith("socket.") or event in _BLOCKED:
        raise PermissionError(f"{event}: network and new processes are disabled in the ebft sandbox")
_BLOCKED = frozenset({"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                      "os.startfile", "pty.spawn", "ctypes.dlsym", "ctypes.dlsym/handle"})
sys.addaudithook(_ebft_guard)
del _ebft_guard
"""

# Runs program.py, then marks a complete run with a nonce the program cannot know in advance, so an
# early os._exit(0) is not mistaken for success.
_RUNNER = """
import sys
{guard}
_source = open("program.py", encoding="utf-8").read()
try:
    exec(compile(_source, "program.py", "exec"), {{"__name__": "__main__"}})
except AssertionError:
    import traceback
    traceback.print_exc()
    sys.stderr.flush()
    sys.exit({fail})
except SystemExit as exc:
    sys.stderr.write(f"SystemExit: the program exited ({{exc.code!r}}) before its tests finished\\n")
    sys.exit(1)
sys.stdout.flush()
sys.stderr.write("\\n{nonce}\\n")
"""


@dataclass(frozen=True)
class ExecutionResult:
    """status: pass / fail / timeout / error; detail: one line saying why (the exception, the timeout);
    stdout, stderr: the last ``KEEP_CHARS`` characters of each; seconds: wall time."""

    status: Status
    detail: str
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "pass"


@functools.lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...] | None:
    """The ``unshare`` command that gives a process an empty network namespace here, or None."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return None
    for prefix in ((unshare, "-n"), (unshare, "-r", "-n")):
        try:
            probe = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return None


def _limits(memory_bytes: int, cpu_seconds: int):
    """preexec_fn: resource limits of the child, applied between fork and exec."""

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 4 * KEEP_CHARS))
        text = handle.read().decode("utf-8", errors="replace")
    return text[-KEEP_CHARS:]


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def run_code(
    code: str,
    tests: str | Sequence[str] = (),
    *,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    isolation: Isolation = "auto",
) -> ExecutionResult:
    """Run ``code`` followed by ``tests`` (a string, or a list of statements such as asserts).

    ``timeout``: wall-clock seconds before the process group is killed (CPU time is capped at the
    next whole second above it too). ``memory_mb``: the address-space limit. ``isolation``: see the
    module docstring; ``namespace`` raises RuntimeError where namespaces are unavailable.
    """
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError("timeout and memory_mb must be positive")
    if isolation not in ("auto", "namespace", "hooks"):
        raise ValueError(f"unknown isolation {isolation!r}; expected auto, namespace or hooks")
    prefix = namespace_prefix() if isolation != "hooks" else None
    if isolation == "namespace" and prefix is None:
        raise RuntimeError("network namespaces (unshare -n) are not available on this machine")
    test_text = tests if isinstance(tests, str) else "\n".join(tests)
    nonce = "ebft-sandbox-done-" + secrets.token_hex(8)
    runner = _RUNNER.format(guard=_GUARD if prefix is None else "", fail=FAIL_EXIT, nonce=nonce)
    command = [*(prefix or ()), sys.executable, "-I", "-c", runner]

    with tempfile.TemporaryDirectory(prefix="ebft-sandbox-") as scratch:
        root = Path(scratch)
        work = root / "work"  # the program's cwd; its captured output lives next to it, out of reach
        work.mkdir()
        (work / "program.py").write_text(code + "\n\n" + test_text + "\n", encoding="utf-8")
        env = {"PATH": os.defpath, "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        started = time.perf_counter()
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen(
                command,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, so a timeout kills its children too
                preexec_fn=_limits(memory_mb * 2**20, math.ceil(timeout) + 1),
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # also any children left behind
                proc.wait()
        seconds = time.perf_counter() - started
        stdout, stderr = _tail(root / "stdout"), _tail(root / "stderr")

    rc = proc.returncode
    cpu_killed = rc in (-signal.SIGXCPU, -signal.SIGKILL)
    if timed_out or cpu_killed:
        return ExecutionResult("timeout", f"timed out after {timeout:g} s", stdout, stderr, seconds)
    if rc == 0 and _last_line(stderr) == nonce:
        return ExecutionResult("pass", "", stdout, stderr.rstrip().removesuffix(nonce).rstrip(), seconds)
    if rc == FAIL_EXIT:
        return ExecutionResult("fail", _last_line(stderr) or "AssertionError", stdout, stderr, seconds)
    if rc == -signal.SIGXFSZ:
        detail = f"wrote more than {FILE_LIMIT // 2**20} MiB"
    elif rc == 0:
        detail = "the program ended the interpreter before its tests finished"
    else:
        detail = _last_line(stderr) or f"exit status {rc}"
    return ExecutionResult("error", detail, stdout, stderr, seconds)

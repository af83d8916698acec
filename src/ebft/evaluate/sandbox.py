"""Run untrusted code and its unit tests in an OS-level sandbox (for pass@k on code rows).

The code is hostile (docs/guide.md, "Security"): each run is a fresh Python under bubblewrap
(``bwrap``, https://github.com/containers/bubblewrap) with

* new PID, mount, network, IPC and UTS namespaces: it sees and can signal only its own processes,
  its network is an unconnected loopback, and when the namespace's first process dies the kernel
  kills every process in it (so nothing outlives the run, whatever it forked or setsid'd);
* a root file system holding only the system libraries and this Python's interpreter and standard
  library, read-only, ``/proc`` of its own PID namespace, a minimal ``/dev``, and a private size-capped
  tmpfs at ``/tmp`` (its working directory and HOME) as the only writable place: no home folder, no
  ``/etc``, no other file of this machine;
* an empty environment, a new session (no controlling terminal), ``--die-with-parent`` (it dies when
  ``ebft evaluate`` dies, however that dies), no capabilities, no new privileges, uid 65534;
* resource limits set by the sandboxed process before the code runs: processes, address space, CPU
  seconds, file size (its stdout and stderr are files: the output cap) and open files.

As an unprivileged user bwrap creates a user namespace and maps the caller to uid 65534 inside. Run as
root it does not: a process whose real user is root is exempt from the process-count limit, so
bwrap runs in its privileged mode (the same namespaces minus the user namespace) and the sandboxed
process gives up root itself, for uid/gid 65534 with no capabilities, before anything else happens
(its process count then includes any other process of uid 65534 on the machine).

The code and a nonce come on stdin; the runner marks a complete run with the nonce, so an early
``os._exit(0)`` is not mistaken for success. The code shares its process with its tests, so code
written to do so can still make its own tests report a pass: the sandbox protects this machine, not
the metric, from hostile code.

Outcome: ``pass`` (the code and tests ran to the end), ``fail`` (an AssertionError), ``timeout``
(wall-clock or CPU time), or ``error`` (any other exception, a syntax error, running out of memory or
processes, an early exit).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import select
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

from ebft.errors import EbftError

Status = Literal["pass", "fail", "timeout", "error"]

BWRAP = "bwrap"
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap; "
    "Arch: pacman -S bubblewrap)"
)
# Exit status of the runner when the program raised AssertionError (any other failure exits 1).
FAIL_EXIT = 3
# Largest file the program may write, its stdout and stderr included, in bytes.
FILE_LIMIT = 16 * 2**20
# Size of the sandbox's only writable place, the tmpfs at /tmp (it lives in memory).
SCRATCH_BYTES = 64 * 2**20
# Processes and threads the sandboxed code may have at once (a fork bomb stops here).
MAX_PROCESSES = 32
MAX_OPEN_FILES = 256
# The unprivileged user the code runs as (nobody on most systems).
SANDBOX_ID = 65534
# Characters of stdout / stderr kept in the result (the end, where tracebacks are).
KEEP_CHARS = 4000
# The directories that hold the system's shared libraries; each is bound read-only (or, where it is a
# symlink on this machine, recreated as the same symlink).
LIBRARY_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32")

# The runner, started by bwrap: it reads the nonce and the program from stdin, drops root where bwrap ran
# as root, sets the limits, then runs the program and its tests.
_RUNNER = """
import os, resource, sys
_nonce, _, _source = sys.stdin.buffer.read().partition(b"\\n")
if os.getuid() == 0:
    os.setgroups([])
    os.setresgid({uid}, {uid}, {uid})
    os.setresuid({uid}, {uid}, {uid})
for _name, _soft, _hard in {limits!r}:
    resource.setrlimit(getattr(resource, _name), (_soft, _hard))
with open("program.py", "wb") as _out:
    _out.write(_source)
_source = _source.decode("utf-8", errors="replace")
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
sys.stderr.write("\\n" + _nonce.decode() + "\\n")
"""


class SandboxUnavailable(EbftError):
    """bubblewrap is missing or cannot create the sandbox on this machine: nothing is run."""


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


def interpreter() -> tuple[str, str]:
    """(this Python's base interpreter, its installation prefix), symlinks resolved: a virtual
    environment's site-packages stay outside the sandbox, its interpreter and standard library are in."""
    executable = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(executable), os.path.realpath(sys.base_prefix)


def read_only_view() -> list[str]:
    """bwrap arguments for the sandbox's read-only files: the library directories and the interpreter.

    The folders above each bound path are made first, world-readable (bwrap would make them private, and
    the code runs as another user than the one that starts bwrap when that is root)."""
    links: list[str] = []
    bound: list[str] = []
    for path in LIBRARY_DIRS:
        if os.path.islink(path):
            links += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            bound.append(path)

    def covered(path: str) -> bool:
        return any(path == root or path.startswith(root + "/") for root in bound)

    executable, prefix = interpreter()
    for sub in dict.fromkeys(("lib", getattr(sys, "platlibdir", "lib"))):
        path = os.path.realpath(os.path.join(prefix, sub))
        if os.path.isdir(path) and not covered(path):
            bound.append(path)
    if not covered(executable):
        bound.append(executable)
    parents = sorted({str(p) for path in bound for p in Path(path).parents if str(p) != "/"} - set(bound))
    dirs = [arg for parent in parents for arg in ("--perms", "0755", "--dir", parent)]
    return dirs + [arg for path in bound for arg in ("--ro-bind", path, path)] + links


@functools.lru_cache(maxsize=4)
def _has_option(bwrap: str, option: str) -> bool:
    usage = subprocess.run([bwrap, "--help"], capture_output=True, text=True, env={}, timeout=30)
    return option in usage.stdout + usage.stderr


def bwrap_command(bwrap: str, *, timeout: float, memory_bytes: int, info_fd: int) -> list[str]:
    """The whole command line: bwrap's namespaces and file system, then the runner under this Python."""
    privileged = os.geteuid() == 0
    if privileged:  # see the module docstring: the runner gives up root itself
        users = ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        users = ["--unshare-user", "--uid", str(SANDBOX_ID), "--gid", str(SANDBOX_ID), "--cap-drop", "ALL"]
        if _has_option(bwrap, "--disable-userns"):  # bubblewrap >= 0.8: no nested user namespaces either
            users.append("--disable-userns")
    cpu = math.ceil(timeout) + 1
    limits = [
        ("RLIMIT_AS", memory_bytes, memory_bytes),
        ("RLIMIT_CPU", cpu, cpu + 1),  # the soft limit's SIGXCPU comes first: reported as a timeout
        ("RLIMIT_FSIZE", FILE_LIMIT, FILE_LIMIT),
        ("RLIMIT_NPROC", MAX_PROCESSES, MAX_PROCESSES),
        ("RLIMIT_NOFILE", MAX_OPEN_FILES, MAX_OPEN_FILES),
        ("RLIMIT_CORE", 0, 0),
    ]
    runner = _RUNNER.format(uid=SANDBOX_ID, limits=limits, fail=FAIL_EXIT)
    executable, _ = interpreter()
    return [
        bwrap,
        *users,
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "sandbox",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--setenv",
        "HOME",
        "/tmp",
        "--setenv",
        "TMPDIR",
        "/tmp",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        *read_only_view(),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--perms",
        "1777",
        "--size",
        str(SCRATCH_BYTES),
        "--tmpfs",
        "/tmp",
        "--chdir",
        "/tmp",
        "--info-fd",
        str(info_fd),
        "--",
        executable,
        "-I",
        "-B",
        "-c",
        runner,
    ]


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


def _namespace_init(info_read: int, wait: float) -> int | None:
    """A pidfd of the sandbox's first process (its PID namespace dies with it), from bwrap's --info-fd;
    None when bwrap exited before starting it."""
    ready, _, _ = select.select([info_read], [], [], wait)
    if not ready:
        return None
    raw = os.read(info_read, 4096)
    try:
        pid = int(json.loads(raw)["child-pid"])
        return os.pidfd_open(pid)
    except (ValueError, KeyError, TypeError, OSError):
        return None


def _kill_namespace(proc: subprocess.Popen, init_fd: int | None) -> None:
    """SIGKILL the namespace's first process (the kernel then kills everything in the namespace) and bwrap,
    and wait until they are gone: when this returns, no process of the run is left."""
    if init_fd is not None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(init_fd, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if init_fd is not None:
        # The first process of a PID namespace ends only after every other process in it is reaped.
        select.select([init_fd], [], [], 10.0)
        os.close(init_fd)


def _launch(bwrap: str, source: bytes, *, timeout: float, memory_mb: int) -> ExecutionResult:
    nonce = "ebft-sandbox-done-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="ebft-sandbox-") as scratch:
        root = Path(scratch)  # on this machine, outside the sandbox: only its output lands here
        info_read, info_write = os.pipe()
        started = time.perf_counter()
        timed_out, init_fd = False, None
        try:
            with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
                proc = subprocess.Popen(
                    bwrap_command(bwrap, timeout=timeout, memory_bytes=memory_mb * 2**20, info_fd=info_write),
                    env={},  # bwrap's own environment is readable in the sandbox's /proc/1
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=err,
                    pass_fds=(info_write,),
                    start_new_session=True,
                )
                os.close(info_write)
                info_write = -1
                try:
                    init_fd = _namespace_init(info_read, timeout)
                    left = max(0.0, timeout - (time.perf_counter() - started))
                    proc.communicate(nonce.encode() + b"\n" + source, timeout=left)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_namespace(proc, init_fd)
        finally:
            os.close(info_read)
            if info_write >= 0:
                os.close(info_write)
        seconds = time.perf_counter() - started
        stdout, stderr = _tail(root / "stdout"), _tail(root / "stderr")
    return _outcome(proc.returncode, timed_out, nonce, stdout, stderr, seconds, timeout)


def _outcome(rc: int, timed_out: bool, nonce: str, stdout: str, stderr: str, seconds: float, timeout: float):
    """bwrap exits with the runner's status, or 128 + the signal that ended it."""
    if timed_out or rc == 128 + signal.SIGXCPU:
        return ExecutionResult("timeout", f"timed out after {timeout:g} s", stdout, stderr, seconds)
    if rc == 0 and _last_line(stderr) == nonce:
        return ExecutionResult("pass", "", stdout, stderr.rstrip().removesuffix(nonce).rstrip(), seconds)
    if rc == FAIL_EXIT:
        return ExecutionResult("fail", _last_line(stderr) or "AssertionError", stdout, stderr, seconds)
    if rc == 0:
        detail = "the program ended the interpreter before its tests finished"
    elif rc > 128:
        detail = f"killed by signal {rc - 128}"
    else:
        detail = _last_line(stderr) or f"exit status {rc}"
    return ExecutionResult("error", detail, stdout, stderr, seconds)


@functools.lru_cache(maxsize=1)
def _checked_bwrap() -> str:
    bwrap = shutil.which(BWRAP)
    if bwrap is None:
        raise SandboxUnavailable(f"--execute runs code only inside a bubblewrap sandbox: {INSTALL_HINT}")
    probe = _launch(bwrap, b"print('ok')", timeout=30.0, memory_mb=1024)
    if probe.status != "pass" or probe.stdout.strip() != "ok":
        raise SandboxUnavailable(
            f"--execute: bubblewrap ({bwrap}) cannot create the sandbox on this machine "
            f"({_last_line(probe.stderr) or probe.detail}); user namespaces may be disabled "
            "(sysctl kernel.unprivileged_userns_clone=1, or a container that allows them)"
        )
    return bwrap


def check_sandbox() -> None:
    """Raise ``SandboxUnavailable`` (with the install line) unless the sandbox works on this machine."""
    _checked_bwrap()


def run_code(code: str, tests: str | Sequence[str] = (), *, timeout: float = 3.0, memory_mb: int = 1024):
    """Run ``code`` followed by ``tests`` (a string, or a list of statements such as asserts) in the
    sandbox; an ``ExecutionResult``.

    ``timeout``: wall-clock seconds before the whole sandbox is killed (CPU time is capped at the next
    whole second above it too). ``memory_mb``: the address-space limit of each process.
    """
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError("timeout and memory_mb must be positive")
    bwrap = _checked_bwrap()
    test_text = tests if isinstance(tests, str) else "\n".join(tests)
    source = (code + "\n\n" + test_text + "\n").encode("utf-8", errors="replace")
    return _launch(bwrap, source, timeout=timeout, memory_mb=memory_mb)

"""The code-execution sandbox: outcomes, timeout, limits, and refusing to run without bubblewrap.
The attacks it must hold against are in test_sandbox_attacks.py."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess

import pytest
from sandbox_helpers import SRC, needs_bwrap

from ebft.evaluate import sandbox
from ebft.evaluate.sandbox import FILE_LIMIT, SCRATCH_BYTES, SandboxUnavailable, run_code


@needs_bwrap
def test_passing_code():
    result = run_code("def add(a, b):\n    return a + b", ["assert add(1, 2) == 3", "print('ok')"])
    assert result.status == "pass", result
    assert result.stdout.strip() == "ok"
    assert result.stderr == ""


@needs_bwrap
def test_failing_assert():
    result = run_code("def add(a, b):\n    return a - b", "assert add(1, 2) == 3, 'wrong sum'")
    assert result.status == "fail"
    assert result.detail == "AssertionError: wrong sum"


@needs_bwrap
def test_other_errors():
    assert run_code("def f(:\n    pass").status == "error"
    raised = run_code("1 / 0")
    assert raised.status == "error" and raised.detail.startswith("ZeroDivisionError")
    # Leaving before the tests run is not a pass, whichever way the program leaves.
    assert run_code("import sys\nsys.exit(0)", "assert False").status == "error"
    assert run_code("import os\nos._exit(0)", "assert False").status == "error"
    killed = run_code("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert killed.status == "error" and killed.detail == "killed by signal 9"


@needs_bwrap
def test_timeout_stops_runaway_code():
    result = run_code("while True:\n    pass", timeout=1.0)
    assert result.status == "timeout"
    assert result.seconds < 5


@needs_bwrap
def test_memory_limit():
    result = run_code("block = bytearray(2 * 1024**3)", memory_mb=256)
    assert result.status == "error"
    assert "MemoryError" in result.detail
    # The same program within the limit runs.
    assert run_code("block = bytearray(16 * 1024**2)", memory_mb=256).status == "pass"


@needs_bwrap
def test_output_and_scratch_space_are_capped():
    # One byte over the file-size cap on stdout: EFBIG (Python ignores SIGXFSZ), an error.
    loud = run_code(f"import sys\nsys.stdout.write('x' * {FILE_LIMIT + 1})\nsys.stdout.flush()")
    assert loud.status == "error" and "File too large" in loud.detail, loud.detail
    # Several files, each under the cap, but together more than the tmpfs holds: ENOSPC.
    per_file = FILE_LIMIT - 1
    files = SCRATCH_BYTES // per_file + 1
    full = run_code(f"for i in range({files}):\n    open(f'f{{i}}', 'wb').write(b'x' * {per_file})")
    assert full.status == "error" and "No space left on device" in full.detail, full.detail


@needs_bwrap
def test_scratch_working_directory_environment_and_view():
    program = (
        "import os, sys\n"
        "print(sorted(os.listdir('.')), os.getcwd(), os.getuid())\n"
        "print(sorted(os.environ))\n"
        "open('out.txt', 'w').write('x')\n"
        "print(sorted(os.listdir('/')))"
    )
    result = run_code(program)
    assert result.status == "pass", result
    listing, env, root = result.stdout.splitlines()
    assert listing == "['program.py'] /tmp 65534"
    assert env == "['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR']"
    # Only what the interpreter needs: no /etc, /home, /root of this machine (a /root here only leads
    # to the interpreter when it lives there, e.g. under pyenv), no /work, no /var.
    allowed = {"dev", "lib", "lib32", "lib64", "libx32", "proc", "root", "tmp", "usr", "home"}
    assert set(ast.literal_eval(root)) <= allowed
    assert "etc" not in root and "var" not in root


def test_bad_arguments():
    with pytest.raises(ValueError):
        run_code("pass", timeout=0)
    with pytest.raises(ValueError):
        run_code("pass", memory_mb=0)


def test_refuses_without_bubblewrap(monkeypatch, tmp_path):
    """No weaker fallback: without bwrap nothing runs, and the error says how to install it."""
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without bwrap
    sandbox._checked_bwrap.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match=r"apt-get install bubblewrap"):
            run_code("open('/tmp/ran', 'w')")
        with pytest.raises(SandboxUnavailable, match=r"bubblewrap sandbox"):
            sandbox.check_sandbox()
    finally:
        sandbox._checked_bwrap.cache_clear()


def test_refuses_when_bubblewrap_cannot_start(monkeypatch, tmp_path):
    """A bwrap that fails (here: a stand-in that exits 1, as bwrap does where user namespaces are off)."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox._checked_bwrap.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match=r"cannot create the sandbox.*uid map: Permission denied"):
            sandbox.check_sandbox()
    finally:
        sandbox._checked_bwrap.cache_clear()


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin")


@needs_bwrap
@pytest.mark.skipif(
    os.geteuid() != 0 or SYSTEM_PYTHON is None or shutil.which("setpriv") is None,
    reason="needs root (to start a process as nobody), setpriv and a system python3",
)
def test_unprivileged_user_path():
    """As a normal user bwrap makes a user namespace; the limits hold there too (the tests above run as
    whoever runs pytest, root on CI: that is bwrap's privileged path)."""
    script = (
        "from ebft.evaluate.sandbox import run_code\n"
        "bomb = 'import os, time\\nn = 0\\ntry:\\n    for _ in range(100):\\n'\n"
        "bomb += '        if os.fork() == 0:\\n            time.sleep(5)\\n            os._exit(0)\\n'\n"
        "bomb += '        n += 1\\nexcept OSError:\\n    pass\\nprint(n)'\n"
        "r = run_code(bomb)\n"
        "print(r.status, r.stdout.strip())\n"
        "r = run_code('import os\\nprint(os.getuid(), sorted(os.listdir(\"/\")))')\n"
        "print(r.status, r.stdout.strip())\n"
    )
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c", script],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC, "PATH": os.defpath},
        cwd="/",
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    bomb, view = done.stdout.splitlines()
    status, children = bomb.split()
    assert status == "pass" and 0 < int(children) < sandbox.MAX_PROCESSES
    assert view.startswith("pass 65534 ") and "etc" not in view

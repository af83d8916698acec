"""Hostile code in the sandbox (docs/guide.md, "Security"): every attack seen against the Python-level
guard it replaced, each asserted to fail while the run still reports an outcome.

Every attack is bounded and safe to run without the sandbox too (that is how each was seen to succeed):
the processes it may kill or leave behind are its own or a helper's, its network target is a loopback
listener of this test, and its fork "bomb" stops at 100 processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sandbox_helpers import daemon_code, kill_all, marked_processes, needs_bwrap, start_evaluator, wait_for

from ebft.evaluate.sandbox import MAX_PROCESSES, run_code

pytestmark = needs_bwrap

SECRET = "hf_" + "s3cr3t" * 4


def test_cannot_read_the_parents_environment(tmp_path):
    """`HF_TOKEN=... ebft evaluate`: the token is in neither the code's environment nor any /proc/PID/environ
    it can read, its parent's included (before: copied to a file, and the run reported a pass)."""
    stolen = tmp_path / "stolen.txt"
    program = f"""
import os
found = [v for v in os.environ.values() if "{SECRET[:6]}" in v]
for pid in [os.getppid(), 1] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
    try:
        environ = open(f"/proc/{{pid}}/environ", "rb").read().decode(errors="replace")
    except OSError:
        continue
    found += [v for v in environ.split("\\0") if "{SECRET[:6]}" in v]
print(len(found))
if found:
    open({str(stolen)!r}, "w").write(repr(found))
"""
    evaluator = start_evaluator(program, timeout=10, env={"HF_TOKEN": SECRET})
    out, err = evaluator.communicate(timeout=60)
    assert evaluator.returncode == 0, err
    assert json.loads(out) == {"status": "pass", "stdout": "0\n"}
    assert not stolen.exists()


def test_cannot_see_the_home_folder_or_files_outside_its_own(tmp_path):
    """The home folder and a token file by absolute path (a stand-in written by the test: the real
    ~/.cache/huggingface/token may not exist), and the real home folder listed."""
    token = tmp_path / ".cache" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_text(SECRET)
    home = Path.home()
    real_token = home / ".cache" / "huggingface" / "token"
    program = f"""
import json, os
seen = {{}}
for path in ({str(token)!r}, {str(real_token)!r}):
    try:
        seen[path] = open(path).read()
    except OSError as exc:
        seen[path] = type(exc).__name__
try:
    seen["home"] = sorted(os.listdir({str(home)!r}))
except OSError as exc:
    seen["home"] = type(exc).__name__
print(json.dumps(seen))
"""
    result = run_code(program)
    assert result.status == "pass", result
    seen = json.loads(result.stdout)
    assert seen[str(token)] == "FileNotFoundError" and seen[str(real_token)] == "FileNotFoundError"
    # At most the folder that leads to this Python's interpreter (e.g. ~/.pyenv), itself read-only.
    prefix = Path(os.path.realpath(sys.base_prefix))
    allowed = {prefix.relative_to(home).parts[0]} if prefix.is_relative_to(home) else set()
    assert seen["home"] == "FileNotFoundError" or set(seen["home"]) <= allowed, seen["home"]


def test_cannot_write_or_delete_outside_its_temporary_folder(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    planted = tmp_path / "planted.txt"
    # Next to the standard library (bound read-only in the sandbox); removed below if it was written.
    in_stdlib = Path(os.__file__).parent / f"ebft-planted-{uuid.uuid4().hex}.txt"
    program = f"""
import os, sys
outcomes = []
for action in (lambda: os.remove({str(victim)!r}), lambda: open({str(planted)!r}, "w").write("x"),
               lambda: open({str(in_stdlib)!r}, "w").write("x")):
    try:
        action()
        outcomes.append("done")
    except OSError as exc:
        outcomes.append(type(exc).__name__)
open("mine.txt", "w").write("its own folder is writable")
print(outcomes, open("mine.txt").read())
"""
    try:
        result = run_code(program)
        assert result.status == "pass", result
        assert "done" not in result.stdout and "its own folder is writable" in result.stdout
        assert victim.read_text() == "keep me"
        assert not planted.exists() and not in_stdlib.exists()
    finally:
        in_stdlib.unlink(missing_ok=True)


def test_cannot_kill_its_parent_and_the_run_still_reports():
    """os.kill(os.getppid(), SIGTERM): the evaluator lives on and reports the outcome (before: rc -15
    and no report)."""
    program = "import os, signal\nos.kill(os.getppid(), signal.SIGTERM)\n"
    evaluator = start_evaluator(program, timeout=10)
    out, err = evaluator.communicate(timeout=60)
    assert evaluator.returncode == 0, err
    assert json.loads(out)["status"] in ("pass", "error"), (out, err)


def test_cannot_kill_other_processes_of_this_machine():
    victim = subprocess.Popen(["sleep", "60"])
    try:
        result = run_code(f"import os, signal\nos.kill({victim.pid}, signal.SIGKILL)")
        assert result.status == "error" and "ProcessLookupError" in result.detail, result
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("then", ["exits", "runs past its timeout"])
def test_nothing_outlives_the_run(then):
    """fork + setsid + fork: the grandchild is gone when run_code returns, on a normal end and at the timeout."""
    marker = "ebft-test-daemon-" + uuid.uuid4().hex
    program = daemon_code(marker) + ("import time\ntime.sleep(0.3)" if then == "exits" else "while True:\n    pass")
    try:
        result = run_code(program, timeout=1.0)
        assert result.status == ("pass" if then == "exits" else "timeout"), result
        assert marked_processes(marker) == []
    finally:
        kill_all(marked_processes(marker))


def test_sigterm_to_the_evaluator_takes_the_sandbox_with_it():
    marker = "ebft-test-daemon-" + uuid.uuid4().hex
    evaluator = start_evaluator(daemon_code(marker) + "import time\ntime.sleep(30)", timeout=20)
    try:
        assert wait_for(lambda: marked_processes(marker), 20), "the daemon never started"
        evaluator.send_signal(signal.SIGTERM)
        evaluator.wait(timeout=20)
        assert wait_for(lambda: not marked_processes(marker), 5)
    finally:
        evaluator.kill()
        evaluator.wait()
        kill_all(marked_processes(marker))


def test_fork_bomb_is_bounded():
    program = """
import os, time
children = 0
try:
    for _ in range(100):
        if os.fork() == 0:
            time.sleep(5)
            os._exit(0)
        children += 1
except OSError as exc:
    print(type(exc).__name__)
print(children)
"""
    result = run_code(program, timeout=5.0)
    assert result.status == "pass", result
    reason, children = result.stdout.split()
    assert reason == "BlockingIOError" and 0 < int(children) < MAX_PROCESSES


def test_subprocesses_run_as_nobody_inside_the_sandbox(tmp_path):
    """No shell or system program exists in the sandbox; the interpreter does, and a child of the code
    runs in the same sandbox: another user, no view of this machine's files."""
    program = f"""
import subprocess, sys
try:
    subprocess.run(["/bin/sh", "-c", "id"], check=True)
    print("shell ran")
except OSError as exc:
    print(type(exc).__name__)
child = subprocess.run([sys.executable, "-c", "import os; print(os.getuid()); open({str(tmp_path / "x")!r}, 'w')"],
                       capture_output=True, text=True)
print(child.stdout.strip(), child.stderr.strip().splitlines()[-1])
"""
    result = run_code(program)
    assert result.status == "pass", result
    lines = result.stdout.splitlines()
    assert lines[0] == "FileNotFoundError"
    uid, error = lines[1].split(" ", 1)
    assert uid == "65534" and error.startswith("FileNotFoundError")
    assert not (tmp_path / "x").exists()


def test_no_network_even_to_this_machines_loopback():
    """A listener on this machine's 127.0.0.1 cannot be reached from the sandbox."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        result = run_code(program)
        assert result.status == "error" and "connected" not in result.stdout, result
        with pytest.raises(TimeoutError):
            server.accept()
    # The control: the same program outside the sandbox does connect (so the test can fail).
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=2).close()

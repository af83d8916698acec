"""The code-execution sandbox: outcomes, timeout, memory limit, no network, in both isolation modes."""

from __future__ import annotations

import socket

import pytest

from ebft.evaluate.sandbox import namespace_prefix, run_code

MODES = [
    pytest.param(
        "namespace",
        marks=pytest.mark.skipif(namespace_prefix() is None, reason="network namespaces unavailable here"),
    ),
    "hooks",
]


@pytest.mark.parametrize("isolation", MODES)
def test_passing_code(isolation):
    result = run_code("def add(a, b):\n    return a + b", ["assert add(1, 2) == 3", "print('ok')"], isolation=isolation)
    assert result.status == "pass", result
    assert result.stdout.strip() == "ok"
    assert result.stderr == ""


@pytest.mark.parametrize("isolation", MODES)
def test_failing_assert(isolation):
    result = run_code("def add(a, b):\n    return a - b", "assert add(1, 2) == 3, 'wrong sum'", isolation=isolation)
    assert result.status == "fail"
    assert result.detail == "AssertionError: wrong sum"


@pytest.mark.parametrize("isolation", MODES)
def test_other_errors(isolation):
    assert run_code("def f(:\n    pass", isolation=isolation).status == "error"
    raised = run_code("1 / 0", isolation=isolation)
    assert raised.status == "error" and raised.detail.startswith("ZeroDivisionError")
    # Leaving before the tests run is not a pass, whichever way the program leaves.
    assert run_code("import sys\nsys.exit(0)", "assert False", isolation=isolation).status == "error"
    assert run_code("import os\nos._exit(0)", "assert False", isolation=isolation).status == "error"


@pytest.mark.parametrize("isolation", MODES)
def test_timeout_stops_runaway_code(isolation):
    result = run_code("while True:\n    pass", timeout=1.0, isolation=isolation)
    assert result.status == "timeout"
    assert result.seconds < 5


@pytest.mark.parametrize("isolation", MODES)
def test_memory_limit(isolation):
    result = run_code("block = bytearray(2 * 1024**3)", memory_mb=256, isolation=isolation)
    assert result.status == "error"
    assert "MemoryError" in result.detail
    # The same program within the limit runs.
    assert run_code("block = bytearray(16 * 1024**2)", memory_mb=256, isolation=isolation).status == "pass"


@pytest.mark.parametrize("isolation", MODES)
def test_network_is_refused(isolation):
    """A server listening on this machine's loopback cannot be reached from the sandbox."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        result = run_code(program, isolation=isolation)
        assert result.status == "error", result
        assert "connected" not in result.stdout
        with pytest.raises(TimeoutError):
            server.accept()
    # The control: the same program outside the sandbox does connect (so the test can fail).
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=2).close()


def test_hooks_block_new_programs():
    """Without a namespace a child program would not inherit the guard, so starting one is refused."""
    result = run_code("import subprocess\nsubprocess.run(['true'])", isolation="hooks")
    assert result.status == "error"
    assert "disabled in the ebft sandbox" in result.detail


def test_scratch_working_directory():
    result = run_code("import os\nprint(sorted(os.listdir('.')))\nopen('out.txt', 'w').write('x')")
    assert result.status == "pass"
    assert result.stdout.strip() == "['program.py']"


def test_bad_arguments():
    with pytest.raises(ValueError):
        run_code("pass", timeout=0)
    with pytest.raises(ValueError):
        run_code("pass", isolation="docker")

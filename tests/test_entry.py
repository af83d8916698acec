"""The ``ebft`` command's entry point sets the OpenMP wait policy of the quickstart before torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Runs the entry point as the console script does, recording OMP_WAIT_POLICY at the moment torch is imported.
PROBE = """
import json, os, sys

seen = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "policy" not in seen:
            seen["policy"] = os.environ.get("OMP_WAIT_POLICY")
        return None

sys.meta_path.insert(0, Watch())
sys.argv = ["ebft", *sys.argv[1:], "--help"]
from ebft.entry import entrypoint

try:
    entrypoint()
except SystemExit:
    pass
print(json.dumps(seen))
"""


@pytest.mark.parametrize(("command", "policy"), [("quickstart", "PASSIVE"), ("train", None)])
def test_the_quickstart_waits_passively_from_before_torch_loads(command, policy):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", PROBE, command], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"policy": policy}  # torch was loaded, and the policy was (or was not) set by then

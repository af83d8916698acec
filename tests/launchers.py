"""``ebft train`` on two CPU processes (gloo) for the multi-process tests.

Every launcher runs as ``sys.executable -m <module>``: the launcher of the Python that runs the tests,
whatever is (or is not) on ``PATH``. A launcher that cannot run fails the test instead of skipping it, so a
green suite always means the multi-process paths were exercised.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# module, its arguments for 2 local processes, its port flag
_LAUNCHERS = {
    "accelerate": ("accelerate.commands.launch", ["--multi_gpu", "--num_processes", "2"], "--main_process_port"),
    "torchrun": ("torch.distributed.run", ["--nproc_per_node", "2"], "--master_port"),
}


def launch_command(launcher: str, port: int, *args: str, entry: tuple[str, ...] = ("-m", "ebft")) -> list[str]:
    """The command line that runs ``ebft <args>`` (or ``python <entry> <args>``) on 2 processes under
    ``launcher`` (accelerate | torchrun)."""
    module, options, port_flag = _LAUNCHERS[launcher]
    if importlib.util.find_spec(module.rpartition(".")[0]) is None or importlib.util.find_spec(module) is None:
        pytest.fail(
            f"multi-process test cannot run: {sys.executable} cannot import {module}; "
            f"install the project's dependencies into this interpreter (pip install -e '.[dev]')"
        )
    return [sys.executable, "-m", module, *options, port_flag, str(port), *entry, *args]


def train_on_two_processes(
    cfg: Path, *args: str, port: int, launcher: str = "accelerate", timeout: float = 300, sft: bool = False
) -> subprocess.CompletedProcess:
    """``ebft train cfg args`` on 2 CPU processes; asserts that it succeeded and returns the finished process.
    ``sft``: train the config with the SFT runner instead (``sft_train.py``, which the CLI does not offer)."""
    command = ("-m", "ebft", "train") if not sft else (str(Path(__file__).with_name("sft_train.py")),)
    res = subprocess.run(
        launch_command(launcher, port, str(cfg), *args, entry=command),
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res

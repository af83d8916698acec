"""``ebft train --tui``: the dashboard's panels on a pseudo-terminal, every log line in
output_dir/train.log and back on the terminal when it closes, an error printed after it closed, and the plain
console when stdout is not a terminal."""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import yaml
from conftest import stdlib_texts
from rich.console import Console

from ebft.cli import main
from ebft.train.runner import Preview
from ebft.train.tui import BLOCKS, Dashboard, RunInfo, sparkline

LEAVE_SCREEN = "\x1b[?1049l"  # the alternate screen ends: the terminal shows its own lines again
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.parametrize(
    ("values", "width", "line"),
    [
        ([1.0, 2.0, 3.0], 8, "▁▅█"),  # (v - 1) / 2 * 7 = 0, 3.5 (rounds to 4), 7
        ([1.0, math.nan, 3.0, math.inf], 8, "▁█"),  # non-finite values are left out
        ([float(v) for v in range(1, 11)], 3, "▁▅█"),  # the last 3: 8, 9, 10
        ([2.0, 2.0], 8, BLOCKS[3] * 2),  # nothing moves: the middle
        ([], 8, ""),
    ],
)
def test_sparkline(values, width, line):
    assert sparkline(values, width) == line


def test_the_panels_draw_what_the_logger_hands_over():
    dashboard = Dashboard("unused", terminal=io.StringIO())
    dashboard.attach(RunInfo("tiny-llama", "ebft strided", 2, "out/run"), progress=None)  # type: ignore[arg-type]
    for step, reward in ((1, 0.0), (2, 0.7), (3, 0.1)):
        dashboard.metrics(step, {"ebft/mean_reward": reward, "loss": 1.0 / step, "ebft/alignment": None})
    dashboard.metrics(2, {"eval/cfm_loss": 0.7})
    dashboard.samples(3, [Preview("sample 5", 0.25, "def f():\n    return 1")])
    screen = Console(file=io.StringIO(), width=120, height=40, record=True)
    screen.print(dashboard._layout())
    text = screen.export_text()
    assert "tiny-llama | ebft strided | 2 processes | out/run" in text
    assert re.search(r"reward\s+▁█▂\s+0\.1", text)  # 0, 0.7, 0.1 -> blocks 0, 7, 1 of 0..7
    assert re.search(r"eval cfm\s+▄\s+0\.7", text)
    assert "alignment" not in text  # logged only as None: no curve
    assert "+0.250 sample 5: def f():\\n    return 1" in text


def _on_terminal(args: list[str], timeout: float = 300, cols: int = 120, rows: int = 40) -> tuple[int, str]:
    """Run ``args`` with stdin, stdout and stderr on a pseudo-terminal of cols x rows; (exit code, all output)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    chunk = os.read(leader, 1 << 16)
                except OSError:  # the process closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(leader)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir) -> dict:
    folder = tmp_path_factory.mktemp("tui")
    data = folder / "code.jsonl"
    data.write_text("".join(json.dumps({"text": t[:3000]}) + "\n" for t in stdlib_texts(12)))
    return {
        "base_model": str(tiny_model_dir),
        "rl": "ebft",
        "ebft": {
            "mode": "strided",
            "stride": 8,
            "context_length": 8,
            "generate_max_len": 4,
            "n_samples_per_prompt": 3,
            "log_rollouts": True,
        },
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "bf16": False,
        "seed": 0,
        "val_set_size": 4,
        "eval_steps": 2,
    }


def _config_file(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path / "run")}))
    return path


def test_the_dashboard_shows_the_run_and_loses_no_line(tmp_path, config):
    code, out = _on_terminal([sys.executable, "-m", "ebft", "train", str(_config_file(tmp_path, config)), "--tui"])
    assert code == 0, out[-3000:]
    drawn, after = out.rsplit(LEAVE_SCREEN, 1)
    screen = ANSI.sub("", drawn)
    for title in ("ebft train", "progress", "metrics", "latest samples", f"log ({tmp_path / 'run' / 'train.log'})"):
        assert title in screen, title
    assert "ebft strided" in screen and "document 0 @8 sample 0" in screen  # run info, a decoded rollout
    assert re.search(f"reward +[{BLOCKS}]+", screen)  # a curve
    log = (tmp_path / "run" / "train.log").read_text()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    evaluations = [r["step"] for r in records if "eval/cfm_loss" in r]
    assert steps == [1, 2, 3] and evaluations == [0, 2, 3]
    for step in steps:
        assert f"\nstep {step} | " in log
    for step in evaluations:
        assert f"\neval step {step} | " in log
    assert "INFO     loading the model" in log and "INFO     done: 3 steps" in log
    # Once the screen is back: the log (short enough to be shown whole) and where it is.
    shown = ANSI.sub("", after)
    assert f"the whole log of {tmp_path / 'run' / 'train.log'}" in shown
    assert "eval step 3 | " in shown and f"full log: {tmp_path / 'run' / 'train.log'}" in shown


def test_an_error_closes_the_dashboard_then_prints(tmp_path, config):
    cfg = _config_file(tmp_path, config)
    code, out = _on_terminal(
        [sys.executable, "-m", "ebft", "train", str(cfg), "--tui", "--resume_from_checkpoint=latest"], timeout=120
    )
    assert code == 2
    message = f"error: resume_from_checkpoint: latest, but {tmp_path / 'run'} holds no checkpoint-N folder"
    assert message in ANSI.sub("", out.rsplit(LEAVE_SCREEN, 1)[1])  # printed on the terminal's own screen
    assert message in (tmp_path / "run" / "train.log").read_text()


def test_without_a_terminal_the_plain_console_shows_the_run(tmp_path, config, capsys):
    assert main(["train", str(_config_file(tmp_path, {**config, "max_steps": 1})), "--tui"]) == 0
    captured = capsys.readouterr()
    assert "--tui: stdout is not a terminal, so the plain console shows the run" in captured.err
    assert "step 1 | " in captured.out
    assert not (tmp_path / "run" / "train.log").exists()

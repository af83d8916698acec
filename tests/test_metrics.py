"""Console line, metrics.jsonl, trackers, rollout log, progress bar, peak memory."""

from __future__ import annotations

import io
import json
import math
import sys
import types
from pathlib import Path

import pytest
from config_builders import read_jsonl
from rich.console import Console

from ebft.errors import ConfigError
from ebft.train.reporting import (
    MetricsLogger,
    Progress,
    RolloutLog,
    format_console_line,
    format_reward_line,
    peak_memory_bytes,
)

FULL = {
    "ebft/alignment": 0.4123,
    "ebft/diversity": 0.0231,
    "ebft/cfm_loss": 4.2314,
    "ebft/mean_reward": 0.3889,
    "loss": 0.12341,
    "learning_rate": 1e-5,
    "grad_norm": 0.529,
    "tokens_per_second": 1234.4,
    "ebft/rl_loss": 0.5,  # logged, but not part of the console line
}


def _capture() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=60), buffer


def test_console_line_formats_and_arrows():
    # Signed 3 decimals for the reward terms, 4 for the loss, 2-digit mantissa for lr, grad to 2
    # places, whole tokens/s: 0.3889 -> +0.389, 0.529 -> 0.53, 1234.4 -> 1234.
    # Arrows: alignment and reward should rise (^), diversity and cfm should fall (v).
    assert format_console_line(12, FULL) == (
        "step 12 | align +0.412 ^ | divers +0.023 v | cfm 4.231 v | reward +0.389 ^ | "
        "loss 0.1234 | lr 1.00e-05 | grad 0.53 | 1234 tok/s"
    )


def test_console_line_negative_values_and_missing_keys():
    metrics = {"ebft/alignment": -0.1, "ebft/diversity": -0.0456, "loss": -0.5, "grad_norm": None}
    assert format_console_line(3, metrics) == "step 3 | align -0.100 ^ | divers -0.046 v | loss -0.5000"
    assert format_console_line(0, {}) == "step 0"


def test_reward_falls_back_to_structured_key():
    assert format_console_line(1, {"ebft/reward": 0.25}) == "step 1 | reward +0.250 ^"
    # The strided key wins when both are present.
    assert format_console_line(1, {"ebft/reward": 0.25, "ebft/mean_reward": -1.0}) == ("step 1 | reward -1.000 ^")


def test_reward_line():
    assert format_reward_line(FULL) == (
        "ebft reward | align +0.412 ^ | divers +0.023 v | cfm 4.231 v | reward +0.389 ^"
    )
    assert format_reward_line({"ebft/cfm_loss": 10.0}) == "ebft reward | cfm 10.000 v"


def test_logger_writes_jsonl_and_prints(tmp_path):
    console, buffer = _capture()
    with MetricsLogger(tmp_path / "run", console=console) as logger:
        logger.log(1, FULL)
        logger.log(2, {"loss": 0.25, "grad_norm": 3})
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows == [{"step": 1, **FULL}, {"step": 2, "loss": 0.25, "grad_norm": 3.0}]
    assert isinstance(rows[1]["grad_norm"], float)
    # Narrow console (60 columns) must not wrap the line: one printed line per step.
    assert buffer.getvalue().splitlines() == [
        format_console_line(1, FULL),
        "step 2 | loss 0.2500 | grad 3.00",
    ]


def test_logger_appends_across_runs(tmp_path):
    for step in (1, 2):
        with MetricsLogger(tmp_path, console=_capture()[0]) as logger:
            logger.log(step, {"loss": float(step)})
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_non_finite_values_become_null(tmp_path):
    console, buffer = _capture()
    with MetricsLogger(tmp_path, console=console) as logger:
        logger.log(5, {"loss": math.nan, "grad_norm": math.inf, "ebft/alignment": -math.inf, "lr": 1.0})
    text = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    # json.loads with a hook that rejects the non-standard constants: the line is strict JSON.
    row = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert row == {"step": 5, "loss": None, "grad_norm": None, "ebft/alignment": None, "lr": 1.0}
    assert "loss nan" in buffer.getvalue()  # the console still shows the NaN


def test_non_main_writes_and_prints_nothing(tmp_path):
    console, buffer = _capture()
    out = tmp_path / "never"
    # Trackers are requested but must not even be imported on a non-main process.
    with MetricsLogger(out, is_main=False, console=console, wandb_project="p") as logger:
        logger.log(1, FULL)
    assert not out.exists()
    assert buffer.getvalue() == ""


def test_tensorboard_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, use_tensorboard=True, config_dict={"seed": 1}, console=_capture()[0]) as logger:
        logger.log(3, {"ebft/alignment": 0.5, "loss": 1.25})
        logger.log(4, {"ebft/alignment": 0.75})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("ebft/alignment")] == [(3, 0.5), (4, 0.75)]
    assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [(3, 1.25)]


def test_tensorboard_missing_is_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install 'ebft\[tensorboard\]'"):
        MetricsLogger(tmp_path / "run", use_tensorboard=True)
    assert not (tmp_path / "run").exists()  # failed before writing anything


def test_wandb_missing_is_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"pip install 'ebft\[wandb\]'"):
        MetricsLogger(tmp_path / "run", wandb_project="proj")
    assert not (tmp_path / "run").exists()


def test_wandb_receives_init_and_steps(tmp_path, monkeypatch):
    calls: list[tuple] = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", dict(data), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with MetricsLogger(
        tmp_path,
        wandb_project="proj",
        wandb_entity="team",
        wandb_name="run-1",
        config_dict={"seed": 7},
        console=_capture()[0],
    ) as logger:
        logger.log(9, {"loss": 0.5, "grad_norm": None})
    assert calls == [
        ("init", {"project": "proj", "entity": "team", "name": "run-1", "config": {"seed": 7}}),
        ("log", {"loss": 0.5}, 9),
        ("finish",),
    ]


def test_rollout_log(tmp_path):
    path = tmp_path / "deep" / "dir" / "rollouts.jsonl"
    log = RolloutLog(path)
    log.append([{"step": 1, "text": "héllo\nworld", "reward": 0.5}, {"step": 1, "reward": math.nan}])
    log.append([])
    log.append([{"step": 2, "rewards": [1.0, math.inf]}])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == '{"step":1,"text":"héllo\\nworld","reward":0.5}'  # compact, one line
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "text": "héllo\nworld", "reward": 0.5},
        {"step": 1, "reward": None},
        {"step": 2, "rewards": [1.0, None]},
    ]


def test_progress_enabled_prints_bar_and_lines_above_it():
    console, buffer = _capture()
    with Progress(3, description="train", console=console) as bar:
        bar.advance()
        bar.console.print("metrics line", markup=False)
        bar.advance(2, postfix="reward +0.389")
    out = buffer.getvalue()
    assert "3/3" in out and "reward +0.389" in out
    assert out.index("metrics line") < out.rindex("3/3")
    # Non-interactive console: the bar is drawn once at the end, not once per update.
    assert out.count("3/3") == 1 and "1/3" not in out


@pytest.mark.parametrize("flags", [{"disable": True}, {"is_main": False}])
def test_progress_disabled_is_silent(flags):
    console, buffer = _capture()
    with Progress(3, console=console, **flags) as bar:
        bar.advance(3, postfix="x")
    assert buffer.getvalue() == ""


def test_peak_memory_cpu_matches_proc_in_bytes():
    peak = peak_memory_bytes("cpu")
    status = Path("/proc/self/status")
    if not status.exists():
        assert peak > 0
        return
    # VmHWM is the kernel's peak-RSS counter in kB; a KiB/bytes mix-up would be off by 1024x.
    hwm_kib = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM"))
    assert 0.5 < peak / (hwm_kib * 1024) < 2.0


def test_peak_memory_cuda_uses_allocator_peak(monkeypatch):
    import torch

    seen = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: seen.append(device) or 123)
    assert peak_memory_bytes("cuda:1") == 123
    assert seen == [torch.device("cuda:1")]

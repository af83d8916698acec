"""Never lose a run: exact resume, interrupts, non-finite steps, checkpoint rotation, multi-process."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import stdlib_texts
from launchers import train_on_two_processes

from ebft.cli import main


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "code.jsonl"
    with path.open("w") as f:
        for text in stdlib_texts(12):
            f.write(json.dumps({"text": text[:3000]}) + "\n")
    return path


def _config(tmp_path: Path, model_dir: Path, data: Path, **over) -> Path:
    cfg = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {
            "mode": "strided",
            "stride": 8,
            "context_length": 8,
            "generate_max_len": 4,
            "n_samples_per_prompt": 3,
            "temperature": 1.0,
            "ce_coef": 0.05,
            "log_rollouts": True,
        },
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 64,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "lr_scheduler": "cosine",
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,  # exercises the torch RNG state across the resume
        "lora_target_linear": True,
        "output_dir": str(tmp_path / "run"),
        "seed": 3,
    }
    for key, value in over.items():
        cfg[key] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter_model.safetensors")


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, data_file):
    cfg = _config(tmp_path, tiny_model_dir, data_file, save_steps=2)
    assert main(["train", str(cfg)]) == 0
    full = tmp_path / "run"
    assert [m["step"] for m in _metrics(full)] == [1, 2, 3, 4]

    # A second output folder holding only what existed at step 2: the checkpoint and the first log lines.
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # step 3 was logged, then a crash
    assert main(["train", str(cfg), f"--output_dir={part}", "--resume_from_checkpoint=latest"]) == 0

    resumed = _metrics(part)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]  # the stale step-3 line was replaced, not duplicated
    for a, b in zip(_metrics(full), resumed, strict=True):
        for key in ("loss", "ebft/alignment", "ebft/mean_reward", "ebft/ce_loss", "grad_norm", "learning_rate"):
            assert a[key] == b[key], (a["step"], key)
    wa, wb = _weights(full), _weights(part)
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_a_finished_run_can_be_extended(tmp_path, tiny_model_dir, data_file):
    """max_steps 2 with save_steps 2 leaves checkpoint-2; resuming it with max_steps 4 runs steps 3 and 4 on
    the schedule of a 4-step run (the new length decides the learning rate from the resumed step on)."""
    cfg = _config(tmp_path, tiny_model_dir, data_file, max_steps=2, save_steps=2)
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert main(["train", str(cfg), "--max_steps=4", "--resume_from_checkpoint=latest"]) == 0
    extended = _metrics(run)
    assert [m["step"] for m in extended] == [1, 2, 3, 4]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    assert main(["train", str(cfg), "--max_steps=4", f"--output_dir={tmp_path / 'fresh'}"]) == 0
    fresh = _metrics(tmp_path / "fresh")
    # Cosine without warmup over T steps: step s runs at 1e-3 * (1 + cos(pi * (s - 1) / T)) / 2.
    # T = 2 for the first part: 1e-3, 5e-4. T = 4 from step 3 on: 5e-4 (cos(pi/2) = 0), 1.4645e-4 (cos(3pi/4)).
    assert [m["learning_rate"] for m in extended] == pytest.approx([1e-3, 5e-4, 5e-4, 1.4645e-4], rel=1e-4)
    assert [m["learning_rate"] for m in extended[2:]] == [m["learning_rate"] for m in fresh[2:]]


@pytest.mark.parametrize(
    ("step", "total", "save_steps", "save_final", "due"),
    [
        (2, 4, 2, False, True),
        (3, 4, 2, False, False),
        (4, 4, 2, False, True),  # the last step falls on save_steps
        (5, 5, 2, False, False),
        (5, 5, 2, True, True),
        (5, 5, None, True, True),
        (4, 5, None, True, False),
        (5, 5, None, False, False),
    ],
)
def test_checkpoint_due_hand_cases(step, total, save_steps, save_final, due):
    from ebft.train.checkpoint import checkpoint_due

    assert checkpoint_due(step, total, save_steps, save_final) is due


def test_save_final_checkpoint_without_save_steps(tmp_path, tiny_model_dir, data_file):
    cfg = _config(tmp_path, tiny_model_dir, data_file, max_steps=1, save_final_checkpoint=True)
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((run / "checkpoint-1" / "trainer_state.json").read_text())["step"] == 1


def test_resuming_past_max_steps_is_a_clear_error(tmp_path, tiny_model_dir, data_file, capsys):
    cfg = _config(tmp_path, tiny_model_dir, data_file, max_steps=2, save_steps=2)
    assert main(["train", str(cfg)]) == 0
    assert main(["train", str(cfg), "--max_steps=1", "--resume_from_checkpoint=latest"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-2 is at step 2" in err and "max_steps" in err


def test_existing_run_is_not_overwritten(tmp_path, tiny_model_dir, data_file, capsys):
    cfg = _config(tmp_path, tiny_model_dir, data_file, max_steps=1)
    assert main(["train", str(cfg)]) == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume_from_checkpoint=latest" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_resume_latest_without_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir, data_file, capsys):
    cfg = _config(tmp_path, tiny_model_dir, data_file, resume_from_checkpoint="latest")
    assert main(["train", str(cfg)]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_save_total_limit_keeps_the_newest(tmp_path, tiny_model_dir, data_file):
    cfg = _config(tmp_path, tiny_model_dir, data_file, max_steps=5, save_steps=1, save_total_limit=2)
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    # Checkpoints at steps 1-5 (the last step falls on save_steps too); only the newest two remain.
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    state = json.loads((run / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["data_position"] == 5
    assert not list(run.glob("*.tmp"))


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, tiny_model_dir, data_file, capsys):
    # SGD at lr 1e30 without clipping turns the weights huge after one step, so every later loss is
    # non-finite: those steps must apply nothing (not even a scheduler step), be counted, and stop the run
    # after two in a row.
    cfg = _config(
        tmp_path,
        tiny_model_dir,
        data_file,
        optimizer="sgd",
        learning_rate=1e30,
        max_grad_norm=None,
        max_steps=8,
        max_consecutive_skipped_steps=2,
        lr_scheduler="linear",
    )
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "consecutive steps" in err and "checkpoint-3" in err
    run = tmp_path / "run"
    metrics = _metrics(run)
    assert metrics[-1]["ebft/skipped_steps"] == 2.0 and metrics[0]["ebft/skipped_steps"] == 0.0
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 2 and state["step"] == 3
    # The skipped steps applied nothing, so the saved state is finite (the weights after step 1).
    import torch

    weights = _weights(run / "checkpoint-3")
    assert all(torch.isfinite(w).all() for w in weights.values())
    # The schedule advanced once, for the one applied step: linear decay over 8 steps without warmup gives
    # lr = 1e30 * (8 - 1) / 8 = 8.75e29 (three scheduler steps would give 1e30 * 5 / 8 = 6.25e29).
    scheduler = torch.load(run / "checkpoint-3" / "scheduler.pt", weights_only=True)
    assert scheduler["last_epoch"] == 1
    assert scheduler["_last_lr"] == [pytest.approx(8.75e29, rel=1e-6)]
    optimizer = torch.load(run / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert [g["lr"] for g in optimizer["param_groups"]] == [pytest.approx(8.75e29, rel=1e-6)]


@contextmanager
def _training(cfg: Path):
    """`ebft train cfg` in a child process that never outlives the test (its max_steps is huge)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ebft", "train", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _wait_for(path: Path, lines: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("training produced no metrics in time")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_model_dir, data_file, sig):
    cfg = _config(tmp_path, tiny_model_dir, data_file, max_steps=10_000)
    run = tmp_path / "run"
    with _training(cfg) as proc:
        _wait_for(run / "metrics.jsonl", 1, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig  # 130 for SIGINT, 143 for SIGTERM
    assert "Resume with" in err and "--resume_from_checkpoint=latest" in err
    saved = sorted(run.glob("checkpoint-*"))
    assert len(saved) == 1
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    assert state["step"] == len(_metrics(run))  # the step in progress was finished, then saved


def test_second_signal_exits_at_once(tmp_path, tiny_model_dir, data_file):
    cfg = _config(tmp_path, tiny_model_dir, data_file, max_steps=10_000, sequence_len=512)
    run = tmp_path / "run"
    with _training(cfg) as proc:
        _wait_for(run / "metrics.jsonl", 1, proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    assert "exiting now" in err


def test_two_processes_match_one_process_with_twice_the_micro_batch(tmp_path, tiny_model_dir, data_file):
    """2 processes x micro-batch 1 == 1 process x micro-batch 2: same documents, rollouts and update."""
    cfg = _config(tmp_path, tiny_model_dir, data_file, max_steps=2, lora_dropout=0.0, optimizer="sgd")
    two, one = tmp_path / "two", tmp_path / "one"
    train_on_two_processes(cfg, "--micro_batch_size=1", f"--output_dir={two}", port=29517)
    assert main(["train", str(cfg), "--micro_batch_size=2", f"--output_dir={one}"]) == 0
    for a, b in zip(_metrics(two), _metrics(one), strict=True):
        for key in ("loss", "ebft/alignment", "ebft/diversity", "ebft/ce_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    wa, wb = _weights(two), _weights(one)
    assert all(((wa[k] - wb[k]).abs() < 1e-6).all() for k in wa)
    rollouts = [json.loads(line) for line in (two / "rollouts.jsonl").read_text().splitlines()]
    assert [(r["step"], r["document"]) for r in rollouts] == [(1, 0), (1, 1), (2, 0), (2, 1)]  # main writes all


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    rows = []
    for text in stdlib_texts(12):
        lines = [line for line in text.splitlines() if line.strip()]
        rows.append({"input": lines[0][:60], "output": "\n".join(lines[1:4])})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_structured_two_processes_match_one_process(tmp_path, tiny_model_dir, pair_file):
    """Structured mode: 2 processes x 4 completions == 1 process x 8 completions (one prompt per process
    vs two prompts on one): same prompts, same rollouts (seeded per prompt), same step-global loss."""
    config = {
        "base_model": str(tiny_model_dir),
        "rl": "ebft",
        "ebft": {"mode": "structured", "ce_coef": 0.05, "use_whitening": True},
        "trl": {
            "num_generations": 4,
            "max_completion_length": 12,
            "temperature": 1.0,
            "scale_rewards": "batch",  # the reward spread is reduced across processes
            "loss_type": "dapo",
            "log_completions": True,
        },
        "datasets": [{"path": str(pair_file), "type": "ebft_opencode.transform"}],
        "sequence_len": 96,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "optimizer": "sgd",
        "bf16": False,
        "seed": 0,
    }
    cfg = tmp_path / "structured.yaml"
    cfg.write_text(yaml.safe_dump(config), encoding="utf-8")
    two, one = tmp_path / "two", tmp_path / "one"
    train_on_two_processes(cfg, "--micro_batch_size=4", f"--output_dir={two}", port=29518)
    assert main(["train", str(cfg), "--micro_batch_size=8", f"--output_dir={one}"]) == 0
    for a, b in zip(_metrics(two), _metrics(one), strict=True):
        for key in ("loss", "ebft/alignment", "ebft/reward", "ebft/ce_loss", "grad_norm", "completions/mean_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    from safetensors.torch import load_file

    wa, wb = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(((wa[k] - wb[k]).abs() < 1e-6).all() for k in wa)
    records = [json.loads(line) for line in (two / "completions.jsonl").read_text().splitlines()]
    assert [(r["step"], r["sample"]) for r in records] == [(s, i) for s in (1, 2) for i in range(8)]

"""One run per output folder (an OS lock), no dead end after a run killed while saving, a full disk said
as such with the earlier checkpoints untouched (docs/guide.md, "Security"; tests/HOSTILE.md)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import stdlib_texts

from ebft.cli import main
from ebft.train import checkpoint as ckpt
from ebft.train import lock as output_lock
from ebft.train.checkpoint_files import verify_manifest


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "code.jsonl"
    path.write_text("".join(json.dumps({"text": t[:2000]}) + "\n" for t in stdlib_texts(8)))
    return path


def _config(folder: Path, model_dir: Path, data: Path, **over) -> Path:
    cfg = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 4, "n_samples_per_prompt": 2},
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 48,
        "micro_batch_size": 1,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_linear": True,
        "output_dir": str(folder / "run"),
        "seed": 1,
        **over,
    }
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _start(cfg: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ebft", "train", str(cfg), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_second_run_into_a_busy_output_dir_is_refused_with_the_holders_pid(tmp_path, tiny_model_dir, data_file):
    """A second `ebft train` into the folder of a running one is refused at once with the first one's PID
    (before: both exited 0 and metrics.jsonl interleaved both runs)."""
    cfg = _config(tmp_path, tiny_model_dir, data_file, max_steps=10_000)
    lock_file, metrics = tmp_path / "run" / output_lock.LOCK_FILE, tmp_path / "run" / "metrics.jsonl"
    first = _start(cfg)
    try:
        # The first run is training (a logged step) and holds the lock for as long as the second one takes.
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            if metrics.exists() and metrics.read_text() and f"pid {first.pid} " in lock_file.read_text():
                break
            time.sleep(0.1)
        second = subprocess.run(
            [sys.executable, "-m", "ebft", "train", str(cfg)], capture_output=True, text=True, timeout=300
        )
        first.send_signal(signal.SIGINT)  # stop after the step under way, with a checkpoint
        _, first_err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 128 + signal.SIGINT, first_err
    assert second.returncode == 2
    assert f"is in use by another ebft run (pid {first.pid} on " in second.stderr.strip().splitlines()[-1]
    steps = _metric_steps(tmp_path / "run")
    assert steps == list(range(1, len(steps) + 1))  # one run's lines, each step once


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path, tiny_model_dir, data_file, capsys):
    cfg = _config(tmp_path, tiny_model_dir, data_file, max_steps=10_000, save_steps=1)
    run = tmp_path / "run"
    holder = _start(cfg)
    try:
        deadline = time.time() + 300
        while not ckpt.checkpoints(run) and time.time() < deadline and holder.poll() is None:
            time.sleep(0.2)
        assert ckpt.checkpoints(run), holder.communicate()
        # Held: a resume is refused too, naming the holder.
        assert main(["train", str(cfg), "--resume_from_checkpoint=latest"]) == 2
        assert f"pid {holder.pid} on " in capsys.readouterr().err
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own; the kernel drops the lock
        holder.communicate()
    step = int(ckpt.checkpoints(run)[-1].name.split("-")[1])
    assert main(["train", str(cfg), "--resume_from_checkpoint=latest", f"--max_steps={step + 1}"]) == 0
    assert _metric_steps(run)[-1] == step + 1


def test_lock_in_one_process_is_exclusive_and_released(tmp_path):
    lock = output_lock.acquire(tmp_path)
    with pytest.raises(Exception, match=rf"in use by another ebft run \(pid {os.getpid()} on "):
        output_lock.acquire(tmp_path)  # a second open file of the same process conflicts too
    lock.release()
    output_lock.acquire(tmp_path).release()


def _leftover(run: Path, name: str) -> None:
    """What a run killed while writing ``name`` leaves: its partial .tmp folder (weights half written)."""
    tmp = run / f"{name}.tmp"
    tmp.mkdir(parents=True)
    (tmp / "adapter_model.safetensors").write_bytes(b"\x00" * 100)


def test_a_run_killed_in_its_first_save_can_be_resumed(tmp_path, tiny_model_dir, data_file, capsys):
    """metrics.jsonl and checkpoint-1.tmp, nothing complete (before: neither resumable nor restartable)."""
    cfg = _config(tmp_path, tiny_model_dir, data_file, save_steps=1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    _leftover(run, "checkpoint-1")
    assert main(["train", str(cfg)]) == 2  # a plain restart still protects the folder, and says what to do
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "--resume_from_checkpoint=latest" in err
    assert "removed checkpoint-1.tmp, left by a run that was stopped while saving" in err  # once the folder is locked
    assert not (run / "checkpoint-1.tmp").exists()
    assert main(["train", str(cfg), "--resume_from_checkpoint=latest"]) == 0
    assert "starting over from step 0" in " ".join(capsys.readouterr().err.split())
    assert _metric_steps(run) == [1, 2]  # the killed run's line is not kept twice
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    verify_manifest(run / "checkpoint-1")


def test_a_leftover_next_to_a_complete_checkpoint_is_removed_on_resume(tmp_path, tiny_model_dir, data_file):
    cfg = _config(tmp_path, tiny_model_dir, data_file, save_steps=1)
    assert main(["train", str(cfg), "--max_steps=1"]) == 0
    run = tmp_path / "run"
    _leftover(run, "checkpoint-2")
    assert main(["train", str(cfg), "--resume_from_checkpoint=latest"]) == 0
    assert not (run / "checkpoint-2.tmp").exists()
    verify_manifest(run / "checkpoint-2")
    assert _metric_steps(run) == [1, 2]


def _full_disk_on(checkpoint: str):
    """A ``save_torch`` whose writes of ``checkpoint`` fail as on a full disk (the write boundary)."""
    real = ckpt.save_torch

    def save_torch(obj, path: Path) -> None:
        if path.parent.name == f"{checkpoint}.tmp":
            with open(path, "wb") as handle:
                handle.write(b"\x00" * 10)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, path)

    return save_torch


def test_a_full_disk_is_reported_and_earlier_checkpoints_stay(tmp_path, tiny_model_dir, data_file, capsys, monkeypatch):
    cfg = _config(tmp_path, tiny_model_dir, data_file, save_steps=1)
    monkeypatch.setattr(ckpt, "save_torch", _full_disk_on("checkpoint-2"))
    run = tmp_path / "run"
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: output_dir: the disk holding {run} is full: writing checkpoint-2 failed")
    assert "the earlier checkpoints (checkpoint-1) are intact" in err and "Traceback" not in err
    assert [p.name for p in run.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-1"]
    verify_manifest(run / "checkpoint-1")
    # Space freed (the patch gone), the run resumes from the intact checkpoint and finishes.
    monkeypatch.undo()
    assert main(["train", str(cfg), "--resume_from_checkpoint=latest"]) == 0
    assert _metric_steps(run) == [1, 2]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs root and a kernel that lets this process mount); unmounted afterwards."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk(tmp_path, tiny_model_dir, data_file, capsys, small_disk):
    """The same on a real file system that fills up: the first checkpoint fits, then a filler file leaves
    less room than a checkpoint needs."""
    cfg = _config(small_disk, tiny_model_dir, data_file, save_steps=1, max_steps=1)
    assert main(["train", str(cfg)]) == 0
    run = small_disk / "run"
    size = sum(p.stat().st_size for p in (run / "checkpoint-1").iterdir())
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\x00" * max(0, free - size // 2))
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume_from_checkpoint=latest", "--max_steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the disk holding" in err and "is full: writing checkpoint-2 failed" in err, err
    assert not (run / "checkpoint-2.tmp").exists() and not (run / "checkpoint-2").exists()
    verify_manifest(run / "checkpoint-1")

"""Resume knows what changed: the checkpoint's saved config against the resumed run's (``train.resume``),
and the resume command printed at an interrupt carries the run's own overrides."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from config_builders import lora_run_config
from conftest import stdlib_texts
from pydantic import BaseModel

from ebft.cli import main
from ebft.config import TrainConfig
from ebft.train.resume import BREAKING, HARMLESS, Launch, changes, classify


def _schema_leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key path of the config schema (sections descended into)."""
    out = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _schema_leaves(annotation, prefix + name + ".")
        else:
            out.append(prefix + name)
    return out


def test_every_config_key_is_classified():
    leaves = _schema_leaves(TrainConfig)
    assert len(leaves) > 100
    unclassified = [path for path in leaves if classify(path) is None]
    assert unclassified == [], "classify these in ebft/train/resume.py (BREAKING or HARMLESS)"
    assert not BREAKING & HARMLESS
    # No stale entry: every classified path is a key of the schema (or a section of one).
    known = set(leaves) | {leaf.rsplit(".", 1)[0] for leaf in leaves if "." in leaf}
    assert sorted((BREAKING | HARMLESS) - known) == []


def test_changes_hand_cases():
    saved = {"learning_rate": 1e-3, "max_steps": 4, "ebft": {"stride": 8, "log_rollouts": False}, "datasets": [1]}
    same = json.loads(json.dumps(saved))
    assert changes(saved, same) == ([], [])
    current = {**same, "learning_rate": 2e-3, "max_steps": 12, "ebft": {"stride": 4, "log_rollouts": True}}
    breaking, harmless = changes(saved, current)
    assert breaking == ["ebft.stride: 8 -> 4", "learning_rate: 0.001 -> 0.002"]
    assert harmless == ["ebft.log_rollouts: false -> true", "max_steps: 4 -> 12"]
    # A whole-valued key (datasets) compares whole; a key only one side has (another ebft version) breaks.
    assert changes(saved, {**same, "datasets": [2]})[0] == ["datasets: [1] -> [2]"]
    assert changes(saved, {**same, "new_key": 1})[0] == ["new_key: (unset) -> 1"]


def test_resume_command_keeps_the_overrides():
    launch = Launch("my cfg.yaml", ("--max_steps=12", "--resume_from_checkpoint=checkpoint-4", "--output_dir=x"))
    command = launch.resume_command(Path("/runs/a b"))
    assert shlex.split(command) == [
        "ebft",
        "train",
        "my cfg.yaml",
        "--max_steps=12",
        "--output_dir=/runs/a b",
        "--resume_from_checkpoint=latest",
    ]


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "code.jsonl"
    path.write_text("".join(json.dumps({"text": t[:2000]}) + "\n" for t in stdlib_texts(8)))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, data_file) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    assert main(["train", str(lora_run_config(folder, tiny_model_dir, data_file))]) == 0
    return folder


def _fresh_copy(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained / "run", tmp_path / "run")
    cfg = yaml.safe_load((trained / "cfg.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_line(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())  # the console wraps long lines


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        ("--learning_rate=0.002", "learning_rate: 0.001 -> 0.002"),
        ("--ebft.n_samples_per_prompt=3", "ebft.n_samples_per_prompt: 2 -> 3"),
        ("--ebft.stride=4", "ebft.stride: 8 -> 4"),
        ("--datasets.0.split=train[:50%]", "datasets: "),
        ("--lora_r=8", "lora_r: 4 -> 8"),
    ],
)
def test_a_resume_that_changes_the_run_is_refused(trained, tmp_path, capsys, override, shown):
    cfg = _fresh_copy(trained, tmp_path)
    assert main(["train", str(cfg), "--resume_from_checkpoint=latest", "--max_steps=3", override]) == 2
    err = _one_line(capsys)
    assert "checkpoint-2 was trained with other settings:" in err and shown in err
    assert "--allow_config_change" in err
    assert not (tmp_path / "run" / "checkpoint-3").exists()


def test_another_base_model_of_the_same_shape_is_refused(trained, tmp_path, capsys, tiny_model_dir):
    cfg = _fresh_copy(trained, tmp_path)
    twin = shutil.copytree(tiny_model_dir, tmp_path / "twin")  # the same weights, even: another model folder
    assert main(["train", str(cfg), "--resume_from_checkpoint=latest", "--max_steps=3", f"--base_model={twin}"]) == 2
    err = _one_line(capsys)
    assert "was trained with other settings: base_model: " in err and '/tiny-llama0" -> ' in err and '/twin"' in err


def test_allow_config_change_goes_on_and_says_what_changed(trained, tmp_path, capsys):
    cfg = _fresh_copy(trained, tmp_path)
    args = [
        "train",
        str(cfg),
        "--resume_from_checkpoint=latest",
        "--max_steps=3",
        "--save_steps=1",
        "--learning_rate=0.002",
    ]
    assert main([*args, "--allow_config_change"]) == 0
    err = _one_line(capsys)
    assert "with changed settings (--allow_config_change): learning_rate: 0.001 -> 0.002" in err
    saved = json.loads((tmp_path / "run" / "checkpoint-3" / "train_config.json").read_text())
    assert saved["learning_rate"] == 0.002  # the next checkpoint records the settings it was trained with


def test_harmless_changes_are_listed_in_one_line(trained, tmp_path, capsys):
    cfg = _fresh_copy(trained, tmp_path)
    args = ["--resume_from_checkpoint=latest", "--max_steps=3", "--logging_steps=2", "--save_total_limit=1"]
    assert main(["train", str(cfg), *args]) == 0
    err = _one_line(capsys)
    assert "with changed settings that leave the run as it was: logging_steps: 1 -> 2; max_steps: 2 -> 3;" in err
    assert "save_total_limit: null -> 1" in err


def test_the_interrupt_message_carries_the_runs_overrides(tmp_path, tiny_model_dir, data_file):
    """`ebft train cfg --max_steps=10000 --logging_steps=1`, interrupted: the resume command keeps both
    (before: `ebft train <config> --output_dir=... --resume_from_checkpoint=latest`, the overrides lost)."""
    cfg = lora_run_config(tmp_path, tiny_model_dir, data_file, save_steps=None)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ebft", "train", str(cfg), "--max_steps=10000", "--logging_steps=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        logged = run / "metrics.jsonl"  # created at set-up; a line means the loop (and its signal handler) runs
        while not (logged.exists() and logged.read_text()) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    command = " ".join(err.split()).split("Resume with: ", 1)[1]
    expected = (
        f"ebft train {cfg} --max_steps=10000 --logging_steps=1 --output_dir={run} --resume_from_checkpoint=latest"
    )
    assert command.startswith(expected), command

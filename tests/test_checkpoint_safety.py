"""Checkpoints are data, never code, and a damaged or foreign one is one line naming the checkpoint and
the file, before training goes on (docs/guide.md, "Security"; tests/HOSTILE.md lists the cases).

Each case damages a copy of one real checkpoint. Two layers are tested: the manifest (size and sha256
of every file, checked before anything loads), and, for a folder whose manifest was rewritten to match
the damage (the files were altered by someone who could also rewrite the manifest), each file's own reader.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from config_builders import lora_run_config
from conftest import stdlib_texts
from safetensors.torch import load_file

from ebft.cli import main
from ebft.train.checkpoint_files import MANIFEST, write_manifest


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "code.jsonl"
    path.write_text("".join(json.dumps({"text": t[:2000]}) + "\n" for t in stdlib_texts(8)))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, data_file) -> Path:
    """A LoRA run of 2 steps with checkpoint-2 (its folder; the config is cfg.yaml next to it)."""
    folder = tmp_path_factory.mktemp("trained")
    cfg = lora_run_config(folder, tiny_model_dir, data_file)
    assert main(["train", str(cfg)]) == 0
    return folder


def _copy(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the trained run (its config pointing at the copy); (config, checkpoint-2)."""
    shutil.copytree(trained / "run", tmp_path / "run")
    cfg = yaml.safe_load((trained / "cfg.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "run")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "cfg.yaml", tmp_path / "run" / "checkpoint-2"


def _resume_error(cfg: Path, capsys, *extra: str) -> str:
    assert main(["train", str(cfg), "--resume_from_checkpoint=latest", "--max_steps=3", *extra]) == 2
    err = capsys.readouterr().err.strip()
    # Log lines may come first; the error is the last line, one line, and no traceback.
    assert "Traceback" not in err and err.count("error: ") == 1, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    return last


class Payload:
    """Unpickling this writes a file: the stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('the payload ran')",))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # a byte of the last tensor's data, so the header still parses
    path.write_bytes(bytes(data))


def _edit_state(key: str, value) -> callable:
    def edit(path: Path) -> None:
        state = json.loads(path.read_text())
        state[key] = value
        path.write_text(json.dumps(state))

    return edit


# (file, damage, what the error says): the six corruptions of the issue, a deleted RNG file, flipped bytes.
DAMAGE = [
    ("adapter_model.safetensors", _truncate, "cannot be read as safetensors"),
    ("optimizer.pt", lambda p: p.write_bytes(b"\x00garbage" * 100), "cannot be read as plain tensors and values"),
    ("trainer_state.json", lambda p: p.write_text('{"step": 2, "data_po'), "not valid JSON"),
    ("scheduler.pt", lambda p: p.write_bytes(b""), "cannot be read as plain tensors and values"),
    ("trainer_state.json", _edit_state("step", "two"), "step must be a non-negative integer, got 'two'"),
    ("trainer_state.json", _edit_state("step", 1.5), "step must be a non-negative integer, got 1.5"),
    ("trainer_state.json", _edit_state("epoch", 1), "unknown key 'epoch'"),
    ("rng_state_0.pt", lambda p: p.unlink(), "missing"),
    ("adapter_model.safetensors", _flip, None),  # the manifest finds it; its content still parses
]
IDS = ["truncated-adapter", "garbage-optimizer", "broken-state", "empty-scheduler", "step-not-int", "step-float"]
IDS += ["extra-key", "deleted-rng", "flipped-adapter"]


@pytest.mark.parametrize(("name", "damage", "reader_says"), DAMAGE, ids=IDS)
def test_the_manifest_finds_the_damaged_file(trained, tmp_path, capsys, name, damage, reader_says):
    cfg, checkpoint = _copy(trained, tmp_path)
    damage(checkpoint / name)
    err = _resume_error(cfg, capsys)
    assert f"{checkpoint / name}:" in err, err
    said = ("missing" if not (checkpoint / name).exists() else "bytes, the manifest records", "sha256")
    assert any(s in err for s in said), err
    assert not (tmp_path / "run" / "checkpoint-3").exists()


@pytest.mark.parametrize(("name", "damage", "reader_says"), [d for d in DAMAGE if d[2]], ids=IDS[:-1])
def test_each_reader_names_the_file_when_the_manifest_agrees(trained, tmp_path, capsys, name, damage, reader_says):
    cfg, checkpoint = _copy(trained, tmp_path)
    damage(checkpoint / name)
    write_manifest(checkpoint)
    err = _resume_error(cfg, capsys)
    assert f"{checkpoint / name}: {reader_says}" in err, err


def test_a_malicious_pickle_in_scheduler_pt_never_runs(trained, tmp_path, capsys):
    """A pickle that runs code (here: writes a file) in scheduler.pt, the manifest rewritten to match."""
    cfg, checkpoint = _copy(trained, tmp_path)
    marker = tmp_path / "payload-ran"
    torch.save({"last_epoch": Payload(marker)}, checkpoint / "scheduler.pt")
    write_manifest(checkpoint)
    err = _resume_error(cfg, capsys)
    assert f"{checkpoint / 'scheduler.pt'}: cannot be read as plain tensors and values" in err
    assert not marker.exists()
    # The control: unpickled the unsafe way, the same file does run its payload (so the test can fail).
    torch.load(checkpoint / "scheduler.pt", weights_only=False)
    assert marker.read_text() == "the payload ran"


def test_a_bare_malicious_pickle_never_runs(trained, tmp_path, capsys):
    cfg, checkpoint = _copy(trained, tmp_path)
    marker = tmp_path / "payload-ran"
    with open(checkpoint / "rng_state_0.pt", "wb") as handle:  # a bare pickle, not even torch's zip format
        pickle.dump(Payload(marker), handle)
    write_manifest(checkpoint)
    err = _resume_error(cfg, capsys)
    assert "rng_state_0.pt: cannot be read as plain tensors and values" in err
    assert not marker.exists()


def test_every_file_of_a_checkpoint_is_plain_data_in_the_manifest(trained):
    checkpoint = trained / "run" / "checkpoint-2"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt"):
        torch.load(checkpoint / name, weights_only=True)  # raises for anything but plain data
    manifest = json.loads((checkpoint / MANIFEST).read_text())["files"]
    on_disk = {p.name for p in checkpoint.iterdir() if p.name != MANIFEST}
    assert set(manifest) == on_disk and "train_config.json" in on_disk
    entry = manifest["adapter_model.safetensors"]
    assert entry["size"] == (checkpoint / "adapter_model.safetensors").stat().st_size and len(entry["sha256"]) == 64


def test_a_missing_manifest_is_named(trained, tmp_path, capsys):
    cfg, checkpoint = _copy(trained, tmp_path)
    (checkpoint / MANIFEST).unlink()
    err = _resume_error(cfg, capsys)
    assert f"{checkpoint / MANIFEST}: missing" in err


def test_a_missing_adapter_is_named(trained, tmp_path, capsys):
    """The adapter deleted (and the manifest rewritten): this LoRA run's checkpoint has nothing to load."""
    cfg, checkpoint = _copy(trained, tmp_path)
    (checkpoint / "adapter_model.safetensors").unlink()
    write_manifest(checkpoint)
    err = _resume_error(cfg, capsys)
    assert f"{checkpoint / 'adapter_model.safetensors'}: missing, but this run trains a LoRA adapter" in err


def test_another_lora_rank_is_named(trained, tmp_path, capsys):
    cfg, checkpoint = _copy(trained, tmp_path)
    err = _resume_error(cfg, capsys, "--lora_r=8", "--allow_config_change")
    assert f"{checkpoint / 'adapter_model.safetensors'}: does not fit this run's adapter" in err
    assert "size mismatch" in err


def _other_shape(tiny_model_dir: Path, out: Path) -> Path:
    """The tiny model with a wider MLP: same tokenizer, other weight shapes."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.intermediate_size *= 2
    LlamaForCausalLM(config).save_pretrained(out)
    for path in tiny_model_dir.iterdir():
        if "token" in path.name or path.name == "special_tokens_map.json":
            shutil.copy(path, out / path.name)
    return out


def test_another_model_shape_is_named(trained, tmp_path, capsys, tiny_model_dir):
    cfg, checkpoint = _copy(trained, tmp_path)
    other = _other_shape(tiny_model_dir, tmp_path / "wider")
    err = _resume_error(cfg, capsys, f"--base_model={other}", "--allow_config_change")
    assert f"{checkpoint / 'adapter_model.safetensors'}: does not fit this run's adapter" in err


def test_full_weights_of_another_shape_are_named(tmp_path, capsys, tiny_model_dir, data_file):
    cfg = lora_run_config(tmp_path, tiny_model_dir, data_file, adapter=None, max_steps=1, save_steps=1)
    assert main(["train", str(cfg)]) == 0
    other = _other_shape(tiny_model_dir, tmp_path / "wider")
    err = _resume_error(cfg, capsys, f"--base_model={other}", "--allow_config_change")
    assert f"{tmp_path / 'run' / 'checkpoint-1' / 'model.safetensors'}: does not fit this model" in err
    # A full checkpoint resumed as a LoRA run: named too.
    err = _resume_error(cfg, capsys, "--adapter=lora", "--allow_config_change")
    assert "adapter_model.safetensors: missing, but this run trains a LoRA adapter" in err
    assert load_file(tmp_path / "run" / "checkpoint-1" / "model.safetensors")  # untouched by the failures


@pytest.mark.parametrize("kind", ["adapter", "full"])
def test_evaluate_refuses_a_malicious_pickled_checkpoint(trained, tmp_path, capsys, tiny_model_dir, kind):
    """`ebft evaluate --checkpoint` of a folder whose weights are a pickle that runs code: one line, never run."""
    folder = tmp_path / "foreign"
    marker = tmp_path / "payload-ran"
    if kind == "adapter":
        shutil.copytree(trained / "run" / "checkpoint-2", folder)
        (folder / "adapter_model.safetensors").unlink()
        torch.save({"base_model.model.lm_head.weight": Payload(marker)}, folder / "adapter_model.bin")
    else:
        shutil.copytree(tiny_model_dir, folder)
        (folder / "model.safetensors").unlink()
        torch.save({"lm_head.weight": Payload(marker)}, folder / "pytorch_model.bin")
    assert main(["evaluate", str(trained / "cfg.yaml"), "--checkpoint", str(folder), "--max-docs", "1"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "refused without being run" in last, last
    assert not marker.exists()

"""Shared builders of the end-to-end training tests: small strided and structured configs, writing a config
next to its output_dir, training through the CLI, and reading what a run leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ebft.cli import main


def strided_config(model_dir: Path | str, data: Path, **top) -> dict:
    """A small strided config; keyword arguments replace top-level keys, ``ebft`` is merged."""
    ebft = {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8, "n_samples_per_prompt": 4}
    ebft.update(top.pop("ebft", {}))
    config = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": ebft,
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 64,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "bf16": False,
        "seed": 0,
    }
    config.update(top)
    return config


def structured_config(model_dir: Path, data: Path, transform: str = "ebft_opencode.transform", **top) -> dict:
    """A small structured config; ``trl`` and ``ebft`` are merged, other keyword arguments replace keys."""
    trl = {
        "num_generations": 4,
        "max_completion_length": 12,
        "temperature": 1.0,
        "log_completions": True,
        # 30 ordinary byte tokens also stop a completion (the random model hardly ever says EOS), so
        # completions of one step have different lengths and some finish.
        "generation_kwargs": {"stop_token_ids": list(range(100, 130))},
    }
    trl.update(top.pop("trl", {}))
    ebft = {"mode": "structured", "use_whitening": True, "ce_coef": 0.03, "feature_layers": [0.5, 1.0]}
    ebft.update(top.pop("ebft", {}))
    config = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": ebft,
        "trl": trl,
        "datasets": [{"path": str(data), "type": transform}],
        "sequence_len": 160,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "bf16": False,
        "seed": 0,
    }
    config.update(top)
    return config


def write_run_config(directory: Path, name: str, config: dict) -> Path:
    """Write config to directory/name.yaml with output_dir directory/name; returns the YAML's path."""
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(directory / name)}), encoding="utf-8")
    return path


def train_run(directory: Path, name: str, config: dict, *overrides: str) -> Path:
    """Train through the CLI and return output_dir; the run must succeed."""
    path = write_run_config(directory, name, config)
    assert main(["train", str(path), *overrides]) == 0
    return directory / name


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def load_weights(run: Path) -> dict[str, torch.Tensor]:
    """The full model's weights a run saved."""
    return load_file(run / "model.safetensors")


def saved_weights(run: Path) -> dict[str, torch.Tensor]:
    """The weights a run saved: its LoRA adapter when it trained one, else the full model."""
    name = "adapter_model.safetensors" if (run / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(run / name)


def assert_same_run(a: Path, b: Path, keys: tuple[str, ...]) -> list[int]:
    """Runs ``a`` and ``b`` logged the same steps with the same ``keys`` (relative 1e-5) and saved the same
    weights (within 1e-6); returns the logged steps."""
    ma, mb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    steps = [m["step"] for m in ma]
    assert steps == [m["step"] for m in mb]
    for x, y in zip(ma, mb, strict=True):
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    assert max_abs_diff(saved_weights(a), saved_weights(b)) < 1e-6
    return steps


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def lora_run_config(folder: Path, model_dir: Path, data: Path, **over) -> Path:
    """A two-step LoRA run with a checkpoint at step 2, written to folder/cfg.yaml (output_dir folder/run)."""
    cfg = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 4, "n_samples_per_prompt": 2},
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 48,
        "micro_batch_size": 1,
        "max_steps": 2,
        "save_steps": 2,
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

"""FSDP2: the config keys, and 2 sharded processes training exactly like 1 unsharded process (CPU, gloo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from config_builders import assert_same_run
from conftest import stdlib_texts
from launchers import train_on_two_processes

from ebft.cli import main
from ebft.config import config_warnings, load_config
from ebft.errors import ConfigError
from ebft.sft.runner import mode as sft_mode
from ebft.train.loop import train

_PORT = iter(range(29631, 29700))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "code.jsonl"
    path.write_text("".join(json.dumps({"text": t[:3000]}) + "\n" for t in stdlib_texts(12)))
    return path


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    rows = []
    for text in stdlib_texts(12):
        lines = [line for line in text.splitlines() if line.strip()]
        rows.append({"input": lines[0][:60], "output": "\n".join(lines[1:4])})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _strided(model_dir: Path, data: Path, **over) -> dict:
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
        },
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 64,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "optimizer": "sgd",
        "bf16": False,
        "seed": 3,
        "fsdp_version": 2,
        "fsdp_config": {"reshard_after_forward": True},
    }
    cfg.update(over)
    return cfg


def _write(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _two_processes(cfg: Path, *args: str) -> None:
    """``ebft train`` under torchrun with 2 processes. FSDP mistakes hang rather than fail: hence the timeout."""
    res = train_on_two_processes(cfg, *args, port=next(_PORT), launcher="torchrun", timeout=180)
    out = res.stdout + res.stderr
    assert "FSDP2: policy sharded over 2 processes" in out
    # The main process states every process's feature-network placement (gathered from each).
    assert "process 0: feature network: " in out and "process 1: feature network: " in out


_STRIDED_KEYS = ("loss", "ebft/alignment", "ebft/diversity", "ebft/ce_loss", "grad_norm")


@pytest.mark.parametrize("adapter", [None, "lora"], ids=["full", "lora"])
def test_strided_two_sharded_processes_match_one_process(tmp_path, tiny_model_dir, data_file, adapter):
    """2 FSDP processes x micro-batch 1 == 1 process x micro-batch 2 (FSDP on, so the single-process path
    runs unsharded with a warning): same rollouts, summed gradients, same update."""
    lora = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True} if adapter else {}
    cfg = _write(tmp_path, _strided(tiny_model_dir, data_file, **lora))
    two, one = tmp_path / "two", tmp_path / "one"
    _two_processes(cfg, "--micro_batch_size=1", f"--output_dir={two}")
    assert main(["train", str(cfg), "--micro_batch_size=2", f"--output_dir={one}"]) == 0
    assert_same_run(two, one, _STRIDED_KEYS)


def test_sft_two_sharded_processes_match_one_process(tmp_path, tiny_model_dir, data_file):
    """The SFT runner gets FSDP2 and several processes from the loop: 2 sharded processes x micro-batch 1 with
    accumulation 2 == 1 process x micro-batch 2 x 2 (the same rows, one step-global mean), weights and loss."""
    cfg = _write(tmp_path, _strided(tiny_model_dir, data_file, gradient_accumulation_steps=2, max_steps=3))
    two, one = tmp_path / "two", tmp_path / "one"
    res = train_on_two_processes(
        cfg, "--micro_batch_size=1", f"--output_dir={two}", port=next(_PORT), launcher="torchrun", sft=True
    )
    assert "FSDP2: policy sharded over 2 processes" in res.stdout + res.stderr
    assert train(load_config(cfg, ["--micro_batch_size=2", f"--output_dir={one}"]), sft_mode()).steps == 3
    assert_same_run(two, one, ("loss", "ce_loss", "grad_norm"))


def test_structured_two_sharded_processes_match_one_process(tmp_path, tiny_model_dir, pair_file):
    """Structured mode with transformers generate (a different number of decoding steps per process)."""
    config = {
        "base_model": str(tiny_model_dir),
        "rl": "ebft",
        "ebft": {"mode": "structured", "ce_coef": 0.05},
        "trl": {"num_generations": 4, "max_completion_length": 12, "temperature": 1.0, "loss_type": "dapo"},
        "datasets": [{"path": str(pair_file), "type": "ebft_opencode.transform"}],
        "sequence_len": 96,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "optimizer": "sgd",
        "bf16": False,
        "seed": 0,
        "fsdp_version": 2,
    }
    cfg = _write(tmp_path, config)
    two, one = tmp_path / "two", tmp_path / "one"
    _two_processes(cfg, "--micro_batch_size=4", f"--output_dir={two}")
    assert main(["train", str(cfg), "--micro_batch_size=8", f"--output_dir={one}"]) == 0
    assert_same_run(two, one, ("loss", "ebft/alignment", "ebft/reward", "ebft/ce_loss", "grad_norm"))


def test_structured_sharded_with_accumulation_checkpointing_and_reuse(tmp_path, tiny_model_dir, pair_file):
    """The paths the other tests leave out: several micro-batches per step (a reduce-scatter after every
    backward), gradient checkpointing (layers recomputed inside the sharded backward) and a rollout batch
    reused for 2 steps (old log-probs taken under the gathered weights). 2 x (2 micro-batches of 2
    completions) == 1 x (2 micro-batches of 4)."""
    config = {
        "base_model": str(tiny_model_dir),
        "rl": "ebft",
        "ebft": {"mode": "structured"},
        "trl": {"num_generations": 2, "max_completion_length": 10, "temperature": 1.0, "num_iterations": 2},
        "datasets": [{"path": str(pair_file), "type": "ebft_opencode.transform"}],
        "sequence_len": 96,
        "gradient_accumulation_steps": 2,
        "gradient_checkpointing": True,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "optimizer": "sgd",
        "bf16": False,
        "seed": 1,
        "fsdp_version": 2,
    }
    cfg = _write(tmp_path, config)
    two, one = tmp_path / "two", tmp_path / "one"
    _two_processes(cfg, "--micro_batch_size=2", f"--output_dir={two}")
    assert main(["train", str(cfg), "--micro_batch_size=4", f"--output_dir={one}"]) == 0
    assert_same_run(two, one, ("loss", "ebft/alignment", "ebft/reward", "grad_norm", "clip_ratio/low_mean"))


@pytest.mark.parametrize("optimizer", ["adamw_torch", "sgd"])
def test_sharded_resume_reproduces_the_uninterrupted_sharded_run(tmp_path, tiny_model_dir, data_file, optimizer):
    """A checkpoint written under FSDP (weights and optimizer state gathered on the main process) resumes
    into freshly sharded processes and continues exactly (plain SGD: no per-parameter state, only its
    learning rate, which the cosine schedule has changed by then)."""
    over = {"optimizer": optimizer, "lr_scheduler": "cosine", "micro_batch_size": 1, "save_steps": 1}
    cfg = _write(tmp_path, _strided(tiny_model_dir, data_file, **over))
    full, part = tmp_path / "full", tmp_path / "part"
    _two_processes(cfg, f"--output_dir={full}")
    part.mkdir()
    shutil.copytree(full / "checkpoint-1", part / "checkpoint-1")
    (part / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    _two_processes(cfg, f"--output_dir={part}", "--resume_from_checkpoint=latest")
    assert_same_run(full, part, (*_STRIDED_KEYS, "learning_rate"))


# -- config ------------------------------------------------------------------------------------


def _load(tmp_path: Path, tiny_model_dir: Path, data_file: Path, **over):
    return load_config(_write(tmp_path, _strided(tiny_model_dir, data_file, **over)))


def test_axolotl_fsdp2_config_is_read(tmp_path, tiny_model_dir, data_file):
    cfg = _load(
        tmp_path,
        tiny_model_dir,
        data_file,
        fsdp_config={
            "fsdp_version": 2,
            "fsdp_reshard_after_forward": False,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
            "state_dict_type": "FULL_STATE_DICT",
            "offload_params": False,
            "cpu_ram_efficient_loading": True,
        },
    )
    assert cfg.fsdp_version == 2
    assert cfg.fsdp_config.reshard_after_forward is False
    assert cfg.fsdp_config.transformer_layer_cls_to_wrap == "LlamaDecoderLayer"
    assert [w.split(";")[0] for w in config_warnings(cfg)] == ["fsdp_config.cpu_ram_efficient_loading: ignored"]


def test_fsdp_version_alone_means_default_settings(tmp_path, tiny_model_dir, data_file):
    cfg = _load(tmp_path, tiny_model_dir, data_file, fsdp_config=None)
    assert cfg.fsdp_config is not None and cfg.fsdp_config.reshard_after_forward is True


_REJECTED = {
    "fsdp1 list": ({"fsdp": ["full_shard", "auto_wrap"], "fsdp_version": None, "fsdp_config": None}, "fsdp: the FSDP1"),
    "version 1": ({"fsdp_version": 1}, "fsdp_version: only FSDP2 is implemented"),
    "config without version": ({"fsdp_version": None}, "fsdp_config: needs fsdp_version: 2"),
    "offload": ({"fsdp_config": {"offload_params": True}}, "fsdp_config.offload_params: offloading"),
    "sharded state dict": ({"fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}}, "fsdp_config.state_dict_type"),
    "size wrap": ({"fsdp_config": {"auto_wrap_policy": "SIZE_BASED_WRAP"}}, "fsdp_config.auto_wrap_policy"),
    "hybrid": ({"fsdp_config": {"sharding_strategy": "HYBRID_SHARD"}}, "fsdp_config.sharding_strategy"),
    "activation checkpointing": (
        {"fsdp_config": {"activation_checkpointing": True}},
        "fsdp_config.activation_checkpointing: set gradient_checkpointing",
    ),
    "unknown key": ({"fsdp_config": {"bogus": 1}}, "fsdp_config.bogus: unknown key"),
}


@pytest.mark.parametrize("over, expected", _REJECTED.values(), ids=_REJECTED.keys())
def test_unsupported_fsdp_settings_are_rejected(tmp_path, tiny_model_dir, data_file, over, expected):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, tiny_model_dir, data_file, **over)
    assert any(line.strip().startswith(expected) for line in str(err.value).splitlines()[1:]), str(err.value)


def test_fsdp_with_vllm_lora_sync_is_rejected(tmp_path, tiny_model_dir, pair_file):
    config = {
        "base_model": str(tiny_model_dir),
        "rl": "ebft",
        "ebft": {"mode": "structured"},
        "trl": {"num_generations": 4, "max_completion_length": 12, "use_vllm": True, "vllm_lora_sync": True},
        "adapter": "lora",
        "lora_target_linear": True,
        "datasets": [{"path": str(pair_file), "type": "ebft_opencode.transform"}],
        "sequence_len": 96,
        "micro_batch_size": 4,
        "fsdp_version": 2,
    }
    with pytest.raises(ConfigError, match="fsdp_version: cannot be combined with trl.vllm_lora_sync"):
        load_config(_write(tmp_path, config))
    config["trl"]["vllm_lora_sync"] = False  # full-weight sync gathers the shards instead
    assert load_config(_write(tmp_path, config)).fsdp_version == 2

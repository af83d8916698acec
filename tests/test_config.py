"""ebft.config: seed-style YAML loads, documented defaults, every error path, overrides, dump round trip."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from ebft.config import (
    IGNORED_AXOLOTL_KEYS,
    UNSUPPORTED_AXOLOTL_KEYS,
    DatasetSpec,
    EbftSection,
    TrainConfig,
    TrlSection,
    VllmSection,
    config_warnings,
    dump_config,
    load_config,
    parse_config,
)
from ebft.errors import ConfigError

# Modelled on the guide's "Strided Mode Configuration" example: structured data, LoRA, flex attention.
GUIDE_STRIDED = """\
base_model: meta-llama/Llama-3.2-1B
rl: ebft

ebft:
  mode: strided
  stride: 8
  context_length: 8
  generate_max_len: 8
  n_samples_per_prompt: 4
  temperature: 0.6
  feature_layers: [0.25, 0.5, 0.75]
  embed_method: last_token
  use_whitening: true
  alignment_coef: 1.0
  diversity_coef: 1.0
  rl_coef: 1.0
  ce_coef: 0.03
  advantage_estimator: rloo
  min_completion_prefix: 8

datasets:
  - path: nvidia/OpenCodeInstruct
    type: ebft_strided_structured.transform
    split: train[:1%]

sequence_len: 2048
micro_batch_size: 1
gradient_accumulation_steps: 2

adapter: lora
lora_r: 16
lora_alpha: 32
lora_target_linear: true

bf16: auto
flex_attention: true
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: true
"""

# Modelled on axolotl's strided pretraining example: raw code, `train_on_split`, axolotl-only keys.
AXOLOTL_STRIDED_PRETRAIN = """\
base_model: meta-llama/Llama-3.2-1B
rl: ebft
ebft:
  mode: strided
  stride: 8
  context_length: 8
  generate_max_len: 8
  n_samples_per_prompt: 4
  temperature: 0.6
  top_p: 1.0
  feature_layers: [0.25, 0.5, 0.75]
  embed_method: last_token
  use_whitening: true
  alignment_coef: 1.0
  diversity_coef: 1.0
  rl_coef: 1.0
  ce_coef: 0.0
  advantage_estimator: rloo
datasets:
  - path: sjelassi/swallow_code_20m
    type: ebft_pretrain.transform
    train_on_split: train[:100]
sequence_len: 256
micro_batch_size: 1
gradient_accumulation_steps: 2
num_epochs: 1
max_steps: 5
learning_rate: 1.0e-6
optimizer: adamw_torch_fused
lr_scheduler: cosine
warmup_steps: 2
adapter: lora
lora_r: 16
lora_alpha: 32
lora_dropout: 0.05
lora_target_linear: true
bf16: auto
flash_attention: false
gradient_checkpointing: true
special_tokens:
  pad_token: "<|end_of_text|>"
val_set_size: 0.0
output_dir: ./outputs/ebft-strided-validation
wandb_project: ebft
logging_steps: 1
save_steps: 100
"""

# Modelled on axolotl's full-parameter strided example (no adapter, torch_dtype, ddp, device_map).
AXOLOTL_STRIDED_FFT = """\
base_model: meta-llama/Llama-3.1-8B
rl: ebft
ebft:
  mode: strided
  use_whitening: true
  diversity_coef: 0.0
datasets:
  - path: sjelassi/swallow_code_20m
    type: ebft_pretrain.transform
    split: train[:5000]
sequence_len: 1024
gradient_accumulation_steps: 4
max_steps: 100
learning_rate: 1.0e-6
weight_decay: 0.01
bf16: auto
torch_dtype: bfloat16
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
ddp: false
device_map:
  "": 0
fp16: false
load_in_8bit: false
special_tokens:
  pad_token: "<|end_of_text|>"
wandb_project: ebft
wandb_name: llama8b-strided-fft
wandb_watch:
"""

# Modelled on the guide's structured quick start (trl: and vllm: blocks).
GUIDE_STRUCTURED = """\
base_model: Qwen/Qwen2-0.5B-Instruct
rl: ebft
ebft:
  feature_layers: [0.25, 0.5, 0.75]
  embed_method: last_token
trl:
  num_generations: 4
  max_completion_length: 256
  use_vllm: true
  vllm_lora_sync: true
  vllm_server_port: 8000
vllm:
  gpu_memory_utilization: 0.5
datasets:
  - path: nvidia/OpenCodeInstruct
    type: ebft_opencode.transform
    split: train[:500]
adapter: lora
lora_r: 16
lora_alpha: 32
lora_target_linear: true
sequence_len: 1024
micro_batch_size: 2
gradient_accumulation_steps: 4
max_steps: 20
learning_rate: 5.0e-6
flash_attention: true
gradient_checkpointing: true
output_dir: ./outputs/ebft-quickstart
"""

MINIMAL: dict[str, Any] = {
    "base_model": "tiny/model",
    "rl": "ebft",
    "ebft": {"mode": "strided"},
    "datasets": [{"path": "data.jsonl", "type": "ebft_pretrain.transform"}],
}

_DELETE = object()


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config(**changes: Any) -> dict[str, Any]:
    """MINIMAL with changes; keys are dotted paths (list items by index), _DELETE removes a key."""
    data = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        key: Any = int(last) if isinstance(node, list) else last
        if value is _DELETE:
            del node[key]
        else:
            node[key] = value
    return data


def load(tmp_path: Path, data: dict[str, Any], overrides: tuple[str, ...] = ()) -> TrainConfig:
    return load_config(write(tmp_path, yaml.safe_dump(data)), overrides)


def error(tmp_path: Path, data: dict[str, Any], overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------------------------
# Seed-style configs load unchanged, with the values they say


def test_guide_strided_config_resolves(tmp_path):
    cfg = load_config(write(tmp_path, GUIDE_STRIDED))
    e = cfg.ebft
    assert (e.mode, e.stride, e.context_length, e.generate_max_len) == ("strided", 8, 8, 8)
    assert (e.n_samples_per_prompt, e.temperature, e.top_p) == (4, 0.6, 1.0)
    assert e.feature_layers == [0.25, 0.5, 0.75]
    assert e.use_whitening is True and e.ce_coef == 0.03 and e.min_completion_prefix == 8
    assert e.advantage_estimator == "rloo" and e.embed_method == "last_token"
    assert cfg.datasets == [
        DatasetSpec(path="nvidia/OpenCodeInstruct", type="ebft_strided_structured.transform", split="train[:1%]")
    ]
    assert (cfg.sequence_len, cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (2048, 1, 2)
    assert (cfg.adapter, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_linear) == ("lora", 16, 32, True)
    assert cfg.bf16 == "auto" and cfg.gradient_checkpointing is True
    assert cfg.gradient_checkpointing_kwargs == {"use_reentrant": True}
    warnings = config_warnings(cfg)  # flex_attention is axolotl's older spelling of attn_implementation
    assert warnings == ["flex_attention: read as attn_implementation: flex_attention (axolotl's older spelling)"]
    assert cfg.attn_implementation == "flex_attention"


def test_axolotl_pretrain_config_resolves(tmp_path):
    cfg = load_config(write(tmp_path, AXOLOTL_STRIDED_PRETRAIN))
    assert cfg.datasets[0].split == "train[:100]"  # axolotl's train_on_split, read as split
    assert cfg.datasets[0].type == "ebft_pretrain.transform" and cfg.datasets[0].pack is None
    assert cfg.special_tokens == {"pad_token": "<|end_of_text|>"}
    assert cfg.learning_rate == 1e-6 and cfg.optimizer == "adamw_torch_fused" and cfg.warmup_steps == 2
    assert (cfg.max_steps, cfg.num_epochs, cfg.save_steps, cfg.logging_steps) == (5, 1.0, 100, 1)
    assert cfg.lora_dropout == 0.05 and cfg.wandb_project == "ebft" and cfg.val_set_size == 0.0
    assert cfg.output_dir == "./outputs/ebft-strided-validation"
    warnings = config_warnings(cfg)  # flash_attention: false asks for what happens anyway: no warning
    assert [w.split(":")[0] for w in warnings] == ["datasets.0.train_on_split"]
    assert "read as split: train[:100]" in warnings[0] and cfg.attn_implementation is None


def test_axolotl_full_parameter_config_resolves(tmp_path):
    cfg = load_config(write(tmp_path, AXOLOTL_STRIDED_FFT))
    assert cfg.adapter is None and cfg.weight_decay == 0.01 and cfg.wandb_name == "llama8b-strided-fft"
    assert cfg.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert cfg.ebft.diversity_coef == 0.0 and cfg.ebft.use_whitening is True
    # One warning per ignored key that has a value; fp16/load_in_8bit: false and wandb_watch: (null)
    # agree with what ebft does, so they pass silently.
    # torch_dtype is honoured (bf16 trained weights), so it is no longer an ignored key.
    assert sorted(w.split(":")[0] for w in config_warnings(cfg)) == ["ddp", "device_map"]
    assert cfg.torch_dtype == "bfloat16"


def test_guide_structured_config_resolves(tmp_path):
    cfg = load_config(write(tmp_path, GUIDE_STRUCTURED))
    assert cfg.ebft.mode == "structured"
    assert cfg.trl == TrlSection(
        num_generations=4, max_completion_length=256, use_vllm=True, vllm_lora_sync=True, vllm_server_port=8000
    )
    assert cfg.vllm == VllmSection(gpu_memory_utilization=0.5)
    assert cfg.learning_rate == 5e-6 and cfg.max_steps == 20
    assert [w.split(":")[0] for w in config_warnings(cfg)] == ["flash_attention"]


# ----------------------------------------------------------------------------------------------
# Defaults: the guide's configuration reference tables, and the plan's root defaults

GUIDE_EBFT_DEFAULTS = {
    "mode": "structured",
    "feature_layers": [0.25, 0.5, 0.75],
    "embed_method": "last_token",
    "use_whitening": False,
    "alignment_coef": 1.0,
    "diversity_coef": 1.0,
    "ce_coef": 0.0,
    "adaptive_max_tokens": True,
    "gt_length_multiplier": 1.5,
    "stride": 8,
    "context_length": 8,
    "generate_max_len": 8,
    "n_samples_per_prompt": 4,
    "temperature": 0.6,
    "top_p": 1.0,
    "rl_coef": 1.0,
    "advantage_estimator": "rloo",
    "min_completion_prefix": 0,
}

ROOT_DEFAULTS = {
    "tokenizer_config": None,
    "trust_remote_code": False,
    "special_tokens": None,
    "val_set_size": 0.0,
    "sequence_len": 2048,
    "micro_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "num_epochs": 1.0,
    "max_steps": None,
    "learning_rate": 1e-5,
    "optimizer": "adamw_torch",
    "lr_scheduler": "cosine",
    "warmup_steps": None,
    "warmup_ratio": None,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "seed": 42,
    "adapter": None,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "bf16": "auto",
    "gradient_checkpointing": False,
    "output_dir": "./outputs/ebft",
    "logging_steps": 1,
    "save_steps": None,
    "use_tensorboard": False,
    "trl": TrlSection(),
    "vllm": VllmSection(),
}


def test_ebft_defaults_match_the_guide(tmp_path):
    # 4 accumulation steps: structured mode (the default) takes whole groups of trl.num_generations = 4.
    cfg = load(tmp_path, config(**{"ebft": {}, "datasets.0.type": None, "gradient_accumulation_steps": 4}))
    assert {key: getattr(cfg.ebft, key) for key in GUIDE_EBFT_DEFAULTS} == GUIDE_EBFT_DEFAULTS
    assert (cfg.ebft.feature_norm, cfg.ebft.whitening_space) == ("per_layer", "feature")


def test_root_defaults(tmp_path):
    cfg = load(tmp_path, config())
    assert {key: getattr(cfg, key) for key in ROOT_DEFAULTS} == ROOT_DEFAULTS
    assert (cfg.datasets[0].split, cfg.datasets[0].pack, cfg.datasets[0].field) == ("train", None, None)


@pytest.mark.parametrize("model", [TrainConfig, EbftSection, DatasetSpec])
def test_every_field_is_described(model):
    undocumented = [name for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert undocumented == []


# ----------------------------------------------------------------------------------------------
# Errors, one table row per way to get a config wrong: (changes to MINIMAL, expected message lines)

ERROR_CASES = {
    "unknown root key": (
        {"lerning_rate": 1e-5},
        ["lerning_rate: unknown key, did you mean 'learning_rate'?"],
    ),
    "unknown ebft key": ({"ebft.strid": 4}, ["ebft.strid: unknown key, did you mean 'stride'?"]),
    "unknown dataset key": (
        {"datasets.0.spilt": "train"},
        ["datasets.0.spilt: unknown key, did you mean 'split'?"],
    ),
    "unknown special token": (
        {"special_tokens": {"pad_tokn": "<pad>"}},
        ["special_tokens.pad_tokn: unknown key, did you mean 'pad_token'?"],
    ),
    "wrong type int": ({"micro_batch_size": "two"}, ["micro_batch_size: must be a whole number (got 'two')"]),
    "wrong type bool": (
        {"ebft.use_whitening": "maybe"},
        ["ebft.use_whitening: must be true or false (got 'maybe')"],
    ),
    "wrong type section": (
        {"ebft": "strided"},
        ["ebft: must be a mapping of keys to values (got 'strided')"],
    ),
    "wrong literal": (
        {"ebft.advantage_estimator": "ppo"},
        ["ebft.advantage_estimator: must be 'rloo', 'group_norm' or 'reinforce' (got 'ppo')"],
    ),
    "bf16 literal": ({"bf16": "yes please"}, ["bf16: must be true, false or 'auto' (got 'yes please')"]),
    "non-finite": ({"learning_rate": float("inf")}, ["learning_rate: must be a finite number (got inf)"]),
    "learning_rate 0": ({"learning_rate": 0.0}, ["learning_rate: must be > 0.0 (got 0.0)"]),
    # 0 would zero every gradient; "no clipping" is spelled null.
    "max_grad_norm 0": ({"max_grad_norm": 0.0}, ["max_grad_norm: must be > 0.0 (got 0.0)"]),
    "logging_steps 0": ({"logging_steps": 0}, ["logging_steps: must be >= 1 (got 0)"]),
    "save_steps 0": ({"save_steps": 0}, ["save_steps: must be >= 1 (got 0)"]),
    "micro_batch_size 0": ({"micro_batch_size": 0}, ["micro_batch_size: must be >= 1 (got 0)"]),
    "accumulation 0": (
        {"gradient_accumulation_steps": 0},
        ["gradient_accumulation_steps: must be >= 1 (got 0)"],
    ),
    "max_steps 0": ({"max_steps": 0}, ["max_steps: must be >= 1 (got 0)"]),
    "num_epochs 0": ({"num_epochs": 0}, ["num_epochs: must be > 0.0 (got 0)"]),
    "warmup_ratio 1": ({"warmup_ratio": 1.0}, ["warmup_ratio: must be < 1.0 (got 1.0)"]),
    "val_set_size negative": ({"val_set_size": -0.1}, ["val_set_size: must be >= 0.0 (got -0.1)"]),
    "val_set_size fractional count": ({"val_set_size": 2.5}, ["val_set_size: from 1 up it counts rows"]),
    "feature layer above 1": (
        {"ebft.feature_layers": [0.5, 1.5]},
        ["ebft.feature_layers.1: must be <= 1.0 (got 1.5)"],
    ),
    "no feature layers": (
        {"ebft.feature_layers": []},
        ["ebft.feature_layers: must have at least 1 item(s) (got [])"],
    ),
    "top_p 0": ({"ebft.top_p": 0.0}, ["ebft.top_p: must be > 0.0 (got 0.0)"]),
    "stride 0": ({"ebft.stride": 0}, ["ebft.stride: must be >= 1 (got 0)"]),
    "negative temperature": ({"ebft.temperature": -0.5}, ["ebft.temperature: must be >= 0.0 (got -0.5)"]),
    "gt_length_multiplier below 0.1": (
        {"ebft.gt_length_multiplier": 0.05},
        ["ebft.gt_length_multiplier: must be >= 0.1 (got 0.05)"],
    ),
    "negative ce_coef": ({"ebft.ce_coef": -0.1}, ["ebft.ce_coef: must be >= 0.0 (got -0.1)"]),
    "bad feature_device": ({"ebft.feature_device": "gpu1"}, ["ebft.feature_device: must be 'cpu', 'cuda'"]),
    "bad transform name": (
        {"datasets.0.type": "pretrain"},
        ["datasets.0.type: must be a 'module.function' name"],
    ),
    "empty dataset list": ({"datasets": []}, ["datasets: must have at least 1 item(s) (got [])"]),
    "missing rl": ({"rl": _DELETE}, ["rl: required: add `rl: ebft`"]),
    "other rl": ({"rl": "grpo"}, ["rl: must be 'ebft'"]),
    "missing ebft": ({"ebft": _DELETE}, ["ebft: the `ebft:` section is required when rl: ebft"]),
    "null ebft": ({"ebft": None}, ["ebft: the `ebft:` section is required when rl: ebft"]),
    "missing base_model": ({"base_model": _DELETE}, ["base_model: required"]),
    "missing dataset path": ({"datasets.0.path": _DELETE}, ["datasets.0.path: required key is missing"]),
    "no block fits": (
        {"sequence_len": 12},
        ["sequence_len: no strided block fits: needs ebft.context_length + ebft.generate_max_len = 8 + 8 = 16"],
    ),
    "both warmups": (
        {"warmup_steps": 10, "warmup_ratio": 0.1},
        ["warmup_steps: set warmup_steps or warmup_ratio"],
    ),
    "lora without targets": (
        {"adapter": "lora"},
        ["adapter: set lora_target_linear: true or lora_target_modules"],
    ),
    "lora target linear false": (
        {"adapter": "lora", "lora_target_linear": False},
        ["adapter: set lora_target_linear: true or lora_target_modules"],
    ),
    "lora target not strings": (
        {"adapter": "lora", "lora_target_modules": [1]},
        ["lora_target_modules: must be a non-empty string or a non-empty list"],
    ),
    "nothing to train": (
        {"ebft.rl_coef": 0.0, "ebft.ce_coef": 0.0},
        ["ebft.rl_coef: rl_coef and ce_coef are both 0"],
    ),
    "pack for another transform": (
        {"datasets.0.type": "ebft_strided_chat.transform", "datasets.0.pack": True},
        ["datasets.0.pack: only ebft_pretrain.transform packs documents"],
    ),
    "strided transform in structured mode": (
        {"ebft.mode": "structured"},
        ["datasets.0.type: 'ebft_pretrain.transform' produces strided-mode rows but ebft.mode is 'structured'"],
    ),
    "structured transform in strided mode": (
        {"datasets.0.type": "ebft_opencode.transform"},
        ["datasets.0.type: 'ebft_opencode.transform' produces structured-mode rows but ebft.mode is 'strided'"],
    ),
    "structured groups do not divide the step": (
        {
            "ebft.mode": "structured",
            "datasets.0.type": None,
            "trl": {"num_generations": 4},
            "micro_batch_size": 3,
        },
        ["micro_batch_size: micro_batch_size * gradient_accumulation_steps = 3 * 1 must be a multiple of"],
    ),
    "fp16": ({"fp16": True}, ["fp16: fp16 training is not supported"]),
    "load_in_8bit without adapter": (
        {"load_in_8bit": True},
        ["load_in_8bit: quantised weights cannot be trained; set adapter: qlora (4-bit) or adapter: lora"],
    ),
    "load_in_4bit without adapter": (
        {"load_in_4bit": True},
        ["load_in_4bit: quantised weights cannot be trained"],
    ),
    "both quantisations": (
        {"load_in_4bit": True, "load_in_8bit": True, "adapter": "lora", "lora_target_linear": True},
        ["load_in_8bit: set load_in_4bit or load_in_8bit, not both"],
    ),
    "qlora without 4-bit": (
        {"adapter": "qlora", "lora_target_linear": True},
        ["adapter: qlora is LoRA over a 4-bit base: set load_in_4bit: true"],
    ),
    "qlora with fsdp": (
        {"adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True, "fsdp_version": 2},
        ["load_in_4bit: cannot be combined with fsdp_version: 2"],
    ),
    "lora_model_dir without adapter": (
        {"lora_model_dir": "sft-adapter"},
        ["lora_model_dir: a LoRA adapter is trained further only with adapter: lora (or qlora)"],
    ),
    "merge_lora without adapter": ({"merge_lora": True}, ["merge_lora: there is no adapter to merge"]),
    "push_to_hub without repo": ({"push_to_hub": True}, ["push_to_hub: set hub_model_id"]),
    "bad hub repo id": ({"hub_model_id": "a/b/c"}, ["hub_model_id: must be 'name' or 'namespace/name'"]),
    "unknown hub strategy": ({"hub_strategy": "sometimes"}, ["hub_strategy: must be 'end', 'every_save'"]),
    "deepspeed": ({"deepspeed": "ds_zero3.json"}, ["deepspeed: DeepSpeed is not supported"]),
    "fsdp": ({"fsdp": ["full_shard"]}, ["fsdp: the FSDP1 option list is not supported"]),
    "train_on_split conflicts with split": (
        {"datasets.0.split": "train", "datasets.0.train_on_split": "train[:10]"},
        ["datasets.0.train_on_split: conflicts with split 'train'"],
    ),
}


@pytest.mark.parametrize("changes, expected", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_config_errors(tmp_path, changes, expected):
    message = error(tmp_path, config(**changes))
    assert message.startswith(f"{tmp_path / 'cfg.yaml'}: invalid config")
    for line in expected:
        assert any(problem.strip().startswith(line) for problem in message.splitlines()[1:]), message


def test_all_problems_reported_together(tmp_path):
    message = error(tmp_path, config(**{"ebft.stride": 0, "bogus": 1, "fp16": True, "micro_batch_size": "x"}))
    assert "4 problems" in message.splitlines()[0]
    assert {line.split(":")[0].strip() for line in message.splitlines()[1:]} == {
        "ebft.stride",
        "bogus",
        "fp16",
        "micro_batch_size",
    }


@pytest.mark.parametrize("key", ["fp16", "load_in_8bit", "load_in_4bit", "deepspeed", "fsdp", "fsdp_config"])
@pytest.mark.parametrize("value", [False, None])
def test_unsupported_keys_pass_when_off(tmp_path, key, value):
    cfg = load(tmp_path, config(**{key: value, "gradient_checkpointing": True}))
    assert config_warnings(cfg) == []


@pytest.mark.parametrize("key", sorted(UNSUPPORTED_AXOLOTL_KEYS))
def test_every_unsupported_key_errors_with_its_reason(tmp_path, key):
    message = error(tmp_path, config(**{key: True}))
    assert f"  {key}: {UNSUPPORTED_AXOLOTL_KEYS[key]} (got True)" in message.splitlines()


@pytest.mark.parametrize("key", sorted(IGNORED_AXOLOTL_KEYS))
def test_every_ignored_key_warns_once(tmp_path, key):
    cfg = load(tmp_path, config(**{key: "some value"}))
    assert config_warnings(cfg) == [f"{key}: ignored; {IGNORED_AXOLOTL_KEYS[key]}"]
    assert key not in yaml.safe_load(dump_config(cfg))  # parsed: chat_template is a prefix of a trl key


def test_ignored_key_set_to_null_is_silent(tmp_path):
    assert config_warnings(load(tmp_path, config(wandb_watch=None, flash_attention=None))) == []


@pytest.mark.parametrize("checkpointing", [False, True])
def test_torch_compile_is_only_ignored_with_or_without_checkpointing(tmp_path, checkpointing):
    # axolotl refuses torch_compile with gradient checkpointing in strided mode (flex BlockMask recompute);
    # ebft never compiles the model, so there is nothing to conflict, only a warning that it is ignored.
    cfg = load(tmp_path, config(torch_compile=True, gradient_checkpointing=checkpointing))
    assert config_warnings(cfg) == [f"torch_compile: ignored; {IGNORED_AXOLOTL_KEYS['torch_compile']}"]


def test_ignored_and_unsupported_keys_do_not_overlap_with_fields():
    fields = set(TrainConfig.model_fields)
    assert not fields & set(IGNORED_AXOLOTL_KEYS)
    assert not fields & set(UNSUPPORTED_AXOLOTL_KEYS)
    assert not set(IGNORED_AXOLOTL_KEYS) & set(UNSUPPORTED_AXOLOTL_KEYS)


def test_boundaries_from_the_guide_are_accepted(tmp_path):
    # The documented minimums themselves are valid values.
    cfg = load(
        tmp_path,
        config(
            **{
                "ebft.gt_length_multiplier": 0.1,
                "ebft.stride": 1,
                "ebft.context_length": 1,
                "ebft.generate_max_len": 1,
                "ebft.temperature": 0.0,
                "ebft.top_p": 1.0,
                "sequence_len": 2,
                "val_set_size": 0.5,
                "warmup_ratio": 0.0,
            }
        ),
    )
    assert cfg.ebft.gt_length_multiplier == 0.1 and cfg.sequence_len == 2


# ----------------------------------------------------------------------------------------------
# File-level errors


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_malformed_yaml_reports_the_line(tmp_path):
    # Line 3 opens a flow sequence that line 4 never closes; the scanner stops on line 4.
    path = write(tmp_path, "base_model: m\nrl: ebft\nebft: {mode: strided, feature_layers: [0.5\ndatasets: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: malformed YAML at line 4")


def test_bad_indentation_reports_the_line(tmp_path):
    path = write(tmp_path, "base_model: m\nebft:\n  mode: strided\n   stride: 4\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line 4, column 10"):
        load_config(path)


def test_duplicate_key_reports_the_line(tmp_path):
    path = write(tmp_path, "base_model: m\nrl: ebft\nebft:\n  stride: 4\n  stride: 8\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line 5.*duplicate key 'stride'"):
        load_config(path)


@pytest.mark.parametrize("text, got", [("- a\n- b\n", "a list"), ("", "an empty file"), ("just text\n", "a str")])
def test_top_level_must_be_a_mapping(tmp_path, text, got):
    with pytest.raises(ConfigError, match=f"top level must be a mapping of keys to values \\(got {got}\\)"):
        load_config(write(tmp_path, text))


# ----------------------------------------------------------------------------------------------
# Overrides


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load(
        tmp_path,
        config(),
        (
            "--ebft.stride=4",
            "--max_steps=10",
            "--learning_rate=3e-5",  # YAML 1.1 reads 3e-5 as a string; it must still become a float
            "--ebft.use_whitening=true",
            "--datasets.0.path=other.jsonl",
            "--ebft.feature_layers=[0.5]",
            "--ebft.context-length=16",  # axolotl's CLI spelling
            "--trl.num_generations=8",  # creates the missing section
            "--wandb_project=",  # empty = null
        ),
    )
    assert (cfg.ebft.stride, cfg.max_steps, cfg.learning_rate, cfg.ebft.use_whitening) == (4, 10, 3e-5, True)
    assert cfg.datasets[0].path == "other.jsonl" and cfg.ebft.feature_layers == [0.5]
    assert cfg.ebft.context_length == 16 and cfg.trl.num_generations == 8 and cfg.wandb_project is None


def test_later_override_wins(tmp_path):
    assert load(tmp_path, config(), ("--ebft.stride=4", "--ebft.stride=2")).ebft.stride == 2


def test_override_can_replace_a_whole_list_item(tmp_path):
    cfg = load(tmp_path, config(), ("--datasets.0={path: b.jsonl, type: ebft_pretrain.transform, pack: false}",))
    assert cfg.datasets[0] == DatasetSpec(path="b.jsonl", type="ebft_pretrain.transform", pack=False)


def test_unknown_override_key_is_an_unknown_key(tmp_path):
    message = error(tmp_path, config(), ("--ebft.strid=4",))
    assert message.startswith(f"{tmp_path / 'cfg.yaml'} (with overrides --ebft.strid=4): invalid config")
    assert "  ebft.strid: unknown key, did you mean 'stride'?" in message.splitlines()


def test_override_value_is_validated(tmp_path):
    assert "  ebft.stride: must be >= 1 (got 0)" in error(tmp_path, config(), ("--ebft.stride=0",)).splitlines()


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("ebft.stride=4", "expected --key.path=value"),
        ("--ebft.stride", "expected --key.path=value"),
        ("--ebft..stride=4", "expected --key.path=value"),
        ("--=4", "expected --key.path=value"),
        ("--datasets.1.path=x", "datasets.1: no such list item (the list has 1 item, indices from 0)"),
        ("--datasets.first.path=x", "datasets.first: no such list item"),
        ("--base_model.revision=main", "base_model is a single value, not a section"),
        ("--ebft.feature_layers=[0.5", "malformed YAML"),
    ],
)
def test_bad_override_syntax(tmp_path, override, fragment):
    message = error(tmp_path, config(), (override,))
    assert message.startswith(f"{tmp_path / 'cfg.yaml'}: override {override!r}")
    assert fragment in message


def test_overrides_do_not_touch_the_callers_mapping():
    data = config()
    parse_config(data, overrides=("--ebft.stride=2", "--datasets.0.path=x"))
    assert data == config()


# ----------------------------------------------------------------------------------------------
# Warnings that follow from values

WARNING_CASES = {
    "one sample with rloo": (
        {"ebft.n_samples_per_prompt": 1},
        [
            "ebft.advantage_estimator: rloo needs n_samples_per_prompt >= 2; with 1 sample it falls back to reinforce",
            "ebft.diversity_coef: diversity disabled",
        ],
    ),
    "one sample with group_norm": (
        {
            "ebft.n_samples_per_prompt": 1,
            "ebft.advantage_estimator": "group_norm",
            "ebft.diversity_coef": 0.0,
        },
        ["ebft.advantage_estimator: group_norm needs n_samples_per_prompt >= 2"],
    ),
    "one sample with reinforce and no diversity": (
        {"ebft.n_samples_per_prompt": 1, "ebft.advantage_estimator": "reinforce", "ebft.diversity_coef": 0.0},
        [],
    ),
    "greedy": ({"ebft.temperature": 0.0}, ["ebft.temperature: 0 means greedy decoding"]),
    # The strided log-probs are taken under the same renormalised top-p truncation: still on-policy.
    "top_p": ({"ebft.top_p": 0.9}, []),
    "zero reward": (
        {"ebft.alignment_coef": 0.0, "ebft.diversity_coef": 0.0},
        ["ebft.alignment_coef: alignment_coef and diversity_coef are both 0"],
    ),
    "whitening space without whitening": (
        {"ebft.whitening_space": "sample"},
        ["ebft.whitening_space: has no effect without ebft.use_whitening: true"],
    ),
    "lora keys without adapter": (
        {"lora_r": 16, "lora_target_linear": True},
        [
            "lora_r: has no effect without adapter: lora",
            "lora_target_linear: has no effect without adapter: lora",
        ],
    ),
    "checkpointing kwargs without checkpointing": (
        {"gradient_checkpointing_kwargs": {"use_reentrant": True}},
        ["gradient_checkpointing_kwargs: has no effect without gradient_checkpointing: true"],
    ),
    "trl and vllm in strided mode": (
        {"trl": {"num_generations": 8}, "vllm": {"gpu_memory_utilization": 0.5}},
        ["trl: used only in structured mode", "vllm: used only in structured mode"],
    ),
    "structured keys in strided mode": (
        {"ebft.gt_length_multiplier": 2.0},
        ["ebft.gt_length_multiplier: used only in structured mode"],
    ),
    "strided keys in structured mode": (
        {"ebft.mode": "structured", "datasets.0.type": None, "ebft.stride": 4, "gradient_accumulation_steps": 4},
        ["ebft.stride: used only in strided mode"],
    ),
    "constant schedule with warmup": (
        {"lr_scheduler": "constant", "warmup_steps": 5},
        ["lr_scheduler: 'constant' has no warmup"],
    ),
    "epochs and max_steps": (
        {"num_epochs": 3, "max_steps": 10},
        ["num_epochs: ignored because max_steps = 10"],
    ),
    "wandb name without project": (
        {"wandb_name": "run"},
        ["wandb_name: has no effect without wandb_project"],
    ),
}


@pytest.mark.parametrize("changes, expected", WARNING_CASES.values(), ids=WARNING_CASES.keys())
def test_value_warnings(tmp_path, changes, expected):
    warnings = config_warnings(load(tmp_path, config(**changes)))
    assert len(warnings) == len(expected), warnings
    for warning, start in zip(warnings, expected, strict=False):
        assert warning.startswith(start), warnings


def test_config_built_in_code_has_only_value_warnings():
    cfg = TrainConfig.model_validate(config(**{"ebft.temperature": 0.0}))
    assert [w.split(":")[0] for w in config_warnings(cfg)] == ["ebft.temperature"]


# ----------------------------------------------------------------------------------------------
# dump_config and to_dict


@pytest.mark.parametrize("text", [GUIDE_STRIDED, AXOLOTL_STRIDED_PRETRAIN, AXOLOTL_STRIDED_FFT, GUIDE_STRUCTURED])
def test_dump_then_load_gives_an_equal_config(tmp_path, text):
    cfg = load_config(write(tmp_path, text))
    dumped = dump_config(cfg)
    again = load_config(write(tmp_path, dumped, "resolved.yaml"))
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    assert dump_config(again) == dumped
    # The resolved file carries no axolotl-only keys, so reloading it warns only about values.
    assert config_warnings(again) == [w for w in config_warnings(cfg) if w in config_warnings(again)]
    assert not any(w.split(":")[0] in IGNORED_AXOLOTL_KEYS for w in config_warnings(again))


def test_dump_writes_every_key(tmp_path):
    dumped = yaml.safe_load(dump_config(load(tmp_path, config())))
    assert list(dumped) == list(TrainConfig.model_fields)
    assert list(dumped["ebft"]) == list(EbftSection.model_fields)
    assert list(dumped["datasets"][0]) == list(DatasetSpec.model_fields)


def test_configs_with_different_values_are_not_equal(tmp_path):
    assert load(tmp_path, config()) != load(tmp_path, config(**{"ebft.stride": 4}))


def test_to_dict_is_plain_nested_data(tmp_path):
    d = load_config(write(tmp_path, GUIDE_STRIDED)).to_dict()
    assert d["ebft"]["stride"] == 8 and d["datasets"][0]["split"] == "train[:1%]" and d["lora_r"] == 16
    assert yaml.safe_load(yaml.safe_dump(d)) == d  # only plain YAML-able types inside

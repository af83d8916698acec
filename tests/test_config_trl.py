"""ebft.config: the typed ``trl:`` and ``vllm:`` blocks, their cross-field checks, warnings and addresses."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from ebft.config import (
    IGNORED_TRL_KEYS,
    IGNORED_VLLM_KEYS,
    LIMITED_TRL_KEYS,
    UNSUPPORTED_TRL_KEYS,
    EbftSection,
    GenerationKwargs,
    TrainConfig,
    TrlSection,
    VllmSection,
    config_warnings,
    dump_config,
    load_config,
    parse_config,
    vllm_client_address,
    vllm_serve_address,
)
from ebft.errors import ConfigError

# The guide's structured quick start ("Quick Start / Structured Mode"), as written there.
GUIDE_QUICKSTART = """\
base_model: Qwen/Qwen2-0.5B-Instruct
rl: ebft
ebft:
  feature_layers: [0.25, 0.5, 0.75]
  embed_method: last_token
  alignment_coef: 1.0
  diversity_coef: 1.0
trl:
  num_generations: 4
  max_completion_length: 256
  temperature: 0.7
  use_vllm: true
  vllm_server_host: 0.0.0.0
  vllm_server_port: 8000
  vllm_lora_sync: true
  vllm_sync_interval: 3
  use_data_producer: true
  async_prefetch: false
  scale_rewards: true
  loss_type: grpo
vllm:
  gpu_memory_utilization: 0.5
  max_model_len: 1024
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
bf16: auto
flash_attention: true
gradient_checkpointing: true
output_dir: ./outputs/ebft-quickstart
"""

# A structured config with no warnings: 4 accumulation steps take one group of 4 completions.
STRUCTURED: dict[str, Any] = {
    "base_model": "tiny/model",
    "rl": "ebft",
    "ebft": {"mode": "structured"},
    "datasets": [{"path": "data.jsonl"}],
    "gradient_accumulation_steps": 4,
}

# What trl.use_vllm needs besides vllm_lora_sync.
LORA = {"adapter": "lora", "lora_target_linear": True}


def config(**changes: Any) -> dict[str, Any]:
    """STRUCTURED with changes; keys are dotted paths, missing sections are created."""
    data = copy.deepcopy(STRUCTURED)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def load(tmp_path: Path, data: dict[str, Any], overrides: tuple[str, ...] = ()) -> TrainConfig:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_config(path, overrides)


def problems(tmp_path: Path, data: dict[str, Any], overrides: tuple[str, ...] = ()) -> list[str]:
    """The problem lines of the ConfigError that loading ``data`` raises."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data, overrides)
    return [line.strip() for line in str(info.value).splitlines()[1:]]


# ----------------------------------------------------------------------------------------------
# Defaults

TRL_DEFAULTS = {
    "num_generations": 4,
    "max_completion_length": 256,
    "temperature": 0.7,
    "top_p": 1.0,
    "top_k": None,
    "min_p": None,
    "repetition_penalty": 1.0,
    "use_vllm": False,
    "vllm_mode": "server",
    "vllm_server_host": None,
    "vllm_server_port": None,
    "vllm_server_timeout": 240.0,
    "vllm_lora_sync": False,
    "vllm_sync_interval": 1,
    "vllm_importance_sampling_correction": True,
    "vllm_importance_sampling_cap": 3.0,
    "vllm_importance_sampling_clip_max": None,
    "vllm_importance_sampling_clip_min": None,
    "use_data_producer": None,
    "async_prefetch": False,
    "streaming_partial_batch": False,
    "skip_zero_advantage_batches": False,
    "scale_rewards": "group",
    "loss_type": "grpo",
    "epsilon": 0.2,
    "epsilon_high": None,
    "num_iterations": 1,
    "mask_truncated_completions": False,
    "generation_kwargs": GenerationKwargs(stop_token_ids=None),
    "chat_template_kwargs": {},
    "log_completions": False,
    "num_completions_to_print": None,
}

VLLM_DEFAULTS = {
    "host": "127.0.0.1",
    "port": 8000,
    "gpu_memory_utilization": 0.9,
    "max_model_len": None,
    "tensor_parallel_size": 1,
    "enforce_eager": False,
    "dtype": "auto",
    "data_parallel_size": 1,
    "enable_prefix_caching": None,
    "weight_transfer_backend": "nccl",
    "weight_transfer_chunk_bytes": 1 << 30,
    "weight_transfer_timeout": 300.0,
}


@pytest.mark.parametrize("section, defaults", [(TrlSection, TRL_DEFAULTS), (VllmSection, VLLM_DEFAULTS)])
def test_section_defaults(section, defaults):
    assert list(section.model_fields) == list(defaults)
    built = section()
    assert {key: getattr(built, key) for key in defaults} == defaults


@pytest.mark.parametrize("written", [{}, {"trl": None, "vllm": None}, {"trl": {}, "vllm": {}}])
def test_missing_null_or_empty_sections_are_all_defaults(tmp_path, written):
    cfg = load(tmp_path, {**STRUCTURED, **written})
    assert isinstance(cfg.trl, TrlSection) and isinstance(cfg.vllm, VllmSection)
    assert cfg.trl == TrlSection() and cfg.vllm == VllmSection()
    assert config_warnings(cfg) == []


def test_sections_built_in_code_are_never_none():
    data = {**STRUCTURED, "trl": None}
    assert TrainConfig.model_validate(data).trl == TrlSection()
    assert TrainConfig.model_validate(STRUCTURED).vllm == VllmSection()


def test_null_nested_trl_keys_are_empty(tmp_path):
    cfg = load(tmp_path, config(**{"trl.generation_kwargs": None, "trl.chat_template_kwargs": None}))
    assert cfg.trl.generation_kwargs == GenerationKwargs() and cfg.trl.chat_template_kwargs == {}


@pytest.mark.parametrize("model", [TrlSection, VllmSection, GenerationKwargs])
def test_every_field_is_described(model):
    assert [name for name, field in model.model_fields.items() if not (field.description or "").strip()] == []


# ----------------------------------------------------------------------------------------------
# Field constraints: (dotted key, bad value, the one problem line)

COLOCATE = "ebft runs vLLM as a separate server (`ebft vllm-serve CFG`); colocate mode is not supported"

FIELD_ERRORS = [
    ("trl", "fast", "trl: must be a mapping of keys to values (got 'fast')"),
    ("vllm", [1], "vllm: must be a mapping of keys to values (got [1])"),
    ("trl.num_generations", 0, "trl.num_generations: must be >= 1 (got 0)"),
    ("trl.num_generations", 2.5, "trl.num_generations: must be a whole number (got 2.5)"),
    ("trl.max_completion_length", 0, "trl.max_completion_length: must be >= 1 (got 0)"),
    ("trl.temperature", -0.1, "trl.temperature: must be >= 0.0 (got -0.1)"),
    ("trl.temperature", float("inf"), "trl.temperature: must be a finite number (got inf)"),
    ("trl.top_p", 0.0, "trl.top_p: must be > 0.0 (got 0.0)"),
    ("trl.top_p", 1.5, "trl.top_p: must be <= 1.0 (got 1.5)"),
    ("trl.top_k", -2, "trl.top_k: must be >= -1 (got -2)"),
    ("trl.top_k", "ten", "trl.top_k: must be a whole number (got 'ten')"),
    ("trl.min_p", -0.1, "trl.min_p: must be >= 0.0 (got -0.1)"),
    ("trl.min_p", 1.5, "trl.min_p: must be <= 1.0 (got 1.5)"),
    ("trl.repetition_penalty", 0.0, "trl.repetition_penalty: must be > 0.0 (got 0.0)"),
    ("trl.use_vllm", "maybe", "trl.use_vllm: must be true or false (got 'maybe')"),
    ("trl.vllm_mode", "remote", "trl.vllm_mode: must be 'server' or 'colocate' (got 'remote')"),
    ("trl.vllm_mode", "colocate", f"trl.vllm_mode: {COLOCATE} (got 'colocate')"),
    ("trl.vllm_server_host", "", "trl.vllm_server_host: must not be empty (got '')"),
    ("trl.vllm_server_port", 0, "trl.vllm_server_port: must be >= 1 (got 0)"),
    ("trl.vllm_server_port", 65536, "trl.vllm_server_port: must be <= 65535 (got 65536)"),
    ("trl.vllm_server_timeout", 0, "trl.vllm_server_timeout: must be > 0.0 (got 0)"),
    ("trl.vllm_lora_sync", "yes please", "trl.vllm_lora_sync: must be true or false (got 'yes please')"),
    ("trl.vllm_sync_interval", 0, "trl.vllm_sync_interval: must be >= 1 (got 0)"),
    (
        "trl.vllm_importance_sampling_correction",
        "maybe",
        "trl.vllm_importance_sampling_correction: must be true or false (got 'maybe')",
    ),
    ("trl.vllm_importance_sampling_cap", 1.0, "trl.vllm_importance_sampling_cap: must be > 1.0 (got 1.0)"),
    ("trl.vllm_importance_sampling_clip_max", 0, "trl.vllm_importance_sampling_clip_max: must be > 0.0 (got 0)"),
    ("trl.vllm_importance_sampling_clip_min", -0.1, "trl.vllm_importance_sampling_clip_min: must be >= 0.0 (got -0.1)"),
    (
        "trl.vllm_importance_sampling_clip_min",
        3.0,
        "trl.vllm_importance_sampling_clip_min: the importance-weight bounds must have low < high (got [3, 3])",
    ),
    (
        "trl.vllm_importance_sampling_clip_max",
        0.5,
        "trl.vllm_importance_sampling_clip_max: the importance-weight bounds must have low < high (got [2, 0.5])",
    ),
    ("trl.use_data_producer", "x", "trl.use_data_producer: must be true or false (got 'x')"),
    ("trl.async_prefetch", 3, "trl.async_prefetch: must be true or false (got 3)"),
    ("trl.streaming_partial_batch", "x", "trl.streaming_partial_batch: must be true or false (got 'x')"),
    ("trl.skip_zero_advantage_batches", "x", "trl.skip_zero_advantage_batches: must be true or false (got 'x')"),
    ("trl.scale_rewards", "yes", "trl.scale_rewards: must be true, false, 'group', 'batch' or 'none' (got 'yes')"),
    ("trl.scale_rewards", 1, "trl.scale_rewards: must be true, false, 'group', 'batch' or 'none' (got 1)"),
    ("trl.loss_type", "ppo", "trl.loss_type: must be 'grpo', 'bnpo', 'dr_grpo' or 'dapo' (got 'ppo')"),
    ("trl.epsilon", 0.0, "trl.epsilon: must be > 0.0 (got 0.0)"),
    ("trl.epsilon_high", "wide", "trl.epsilon_high: must be a number (got 'wide')"),
    ("trl.num_iterations", 0, "trl.num_iterations: must be >= 1 (got 0)"),
    ("trl.mask_truncated_completions", "x", "trl.mask_truncated_completions: must be true or false (got 'x')"),
    ("trl.generation_kwargs", 5, "trl.generation_kwargs: must be a mapping of keys to values (got 5)"),
    (
        "trl.generation_kwargs.stop_token_ids",
        [151645, -1],
        "trl.generation_kwargs.stop_token_ids.1: must be >= 0 (got -1)",
    ),
    ("trl.generation_kwargs.stop_token_ids", 7, "trl.generation_kwargs.stop_token_ids: must be a list (got 7)"),
    ("trl.chat_template_kwargs", "x", "trl.chat_template_kwargs: must be a mapping of keys to values (got 'x')"),
    ("trl.log_completions", "x", "trl.log_completions: must be true or false (got 'x')"),
    ("trl.num_completions_to_print", -1, "trl.num_completions_to_print: must be >= 0 (got -1)"),
    ("vllm.host", "", "vllm.host: must not be empty (got '')"),
    ("vllm.port", 0, "vllm.port: must be >= 1 (got 0)"),
    ("vllm.port", 70000, "vllm.port: must be <= 65535 (got 70000)"),
    ("vllm.gpu_memory_utilization", 0.0, "vllm.gpu_memory_utilization: must be > 0.0 (got 0.0)"),
    ("vllm.gpu_memory_utilization", 1.1, "vllm.gpu_memory_utilization: must be <= 1.0 (got 1.1)"),
    ("vllm.max_model_len", 0, "vllm.max_model_len: must be >= 1 (got 0)"),
    ("vllm.tensor_parallel_size", 0, "vllm.tensor_parallel_size: must be >= 1 (got 0)"),
    ("vllm.enforce_eager", "x", "vllm.enforce_eager: must be true or false (got 'x')"),
    ("vllm.dtype", "fp8", "vllm.dtype: must be 'auto', 'bfloat16', 'float16' or 'float32' (got 'fp8')"),
]


@pytest.mark.parametrize("key, value, expected", FIELD_ERRORS, ids=[f"{k}={v!r}" for k, v, _ in FIELD_ERRORS])
def test_field_constraint_errors(tmp_path, key, value, expected):
    assert problems(tmp_path, config(**{key: value})) == [expected]


FIELD_EDGES_ACCEPTED = [
    ("trl.temperature", 0.0, 0.0),
    ("trl.top_p", 1.0, 1.0),
    ("trl.min_p", 0.0, 0.0),
    ("trl.min_p", 1.0, 1.0),
    ("trl.top_k", 50, 50),
    ("trl.top_k", 0, None),  # the two spellings of "off" are stored as null
    ("trl.top_k", -1, None),
    ("trl.vllm_server_port", 65535, 65535),
    ("trl.vllm_importance_sampling_cap", 1.5, 1.5),
    ("trl.num_completions_to_print", 0, 0),
    ("trl.generation_kwargs.stop_token_ids", [0, 151645], [0, 151645]),
    ("trl.chat_template_kwargs", {"enable_thinking": False}, {"enable_thinking": False}),
    ("vllm.gpu_memory_utilization", 1.0, 1.0),
    ("vllm.port", 1, 1),
    ("vllm.dtype", "bfloat16", "bfloat16"),
]


@pytest.mark.parametrize("key, value, stored", FIELD_EDGES_ACCEPTED)
def test_field_edge_values_are_accepted(tmp_path, key, value, stored):
    cfg = load(tmp_path, config(**{key: value}))
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == stored


@pytest.mark.parametrize("written, stored", [(True, "group"), (False, "none"), ("batch", "batch"), ("none", "none")])
def test_scale_rewards_accepts_trl_booleans(tmp_path, written, stored):
    cfg = load(tmp_path, config(**{"trl.scale_rewards": written}))
    assert cfg.trl.scale_rewards == stored
    assert yaml.safe_load(dump_config(cfg))["trl"]["scale_rewards"] == stored


# (written trl keys, (low, high)) of the importance-weight clamp.
IMPORTANCE_BOUNDS = [
    ({}, (1 / 3, 3.0)),  # ebft's default: [1/cap, cap]
    ({"vllm_importance_sampling_cap": 4.0}, (0.25, 4.0)),
    ({"vllm_importance_sampling_clip_max": 5.0}, (0.2, 5.0)),  # clip_max replaces cap, low = 1/5
    ({"vllm_importance_sampling_clip_min": 0.5}, (0.5, 3.0)),
    ({"vllm_importance_sampling_clip_min": 0.0, "vllm_importance_sampling_clip_max": 2.0}, (0.0, 2.0)),
    # The same bound written under both names is accepted.
    ({"vllm_importance_sampling_cap": 2.0, "vllm_importance_sampling_clip_max": 2.0}, (0.5, 2.0)),
    ({"vllm_importance_sampling_clip_min": 0.9, "vllm_importance_sampling_clip_max": 0.95}, (0.9, 0.95)),
]


@pytest.mark.parametrize("written, bounds", IMPORTANCE_BOUNDS)
def test_importance_weight_bounds(tmp_path, written, bounds):
    cfg = load(tmp_path, config(trl=written))
    assert cfg.trl.importance_weight_bounds == pytest.approx(bounds)
    assert parse_config(yaml.safe_load(dump_config(cfg))).trl.importance_weight_bounds == pytest.approx(bounds)


def test_cap_and_clip_max_must_agree(tmp_path):
    trl = {"vllm_importance_sampling_cap": 2.0, "vllm_importance_sampling_clip_max": 4.0}
    assert problems(tmp_path, config(trl=trl)) == [
        "trl.vllm_importance_sampling_cap: conflicts with vllm_importance_sampling_clip_max, the newer name of the "
        "same upper bound (4.0); keep only clip_max (got 2.0)"
    ]


def test_clip_high_falls_back_to_epsilon():
    assert TrlSection(epsilon=0.2).clip_high == 0.2
    assert TrlSection(epsilon=0.2, epsilon_high=0.28).clip_high == 0.28


# ----------------------------------------------------------------------------------------------
# Unknown keys: the closest valid key, or what to use instead

GENERATION_KWARGS_ONLY = (
    "unknown key; generation_kwargs takes only stop_token_ids, the other sampling settings have trl keys of "
    "their own (temperature, top_p, top_k, min_p, repetition_penalty, max_completion_length)"
)

UNKNOWN_KEYS = [
    ("trl.num_generation", "trl.num_generation: unknown key, did you mean 'num_generations'?"),
    ("trl.vllm_server_hots", "trl.vllm_server_hots: unknown key, did you mean 'vllm_server_host'?"),
    ("trl.bta", "trl.bta: unknown key, did you mean 'beta'?"),  # an accepted axolotl key counts
    ("trl.zzz", "trl.zzz: unknown key"),
    ("vllm.gpu_memory", "vllm.gpu_memory: unknown key, did you mean 'gpu_memory_utilization'?"),
    (
        "vllm.zzz",
        "vllm.zzz: unknown key; valid keys here: host, port, gpu_memory_utilization, max_model_len, "
        "tensor_parallel_size, enforce_eager, dtype, data_parallel_size, enable_prefix_caching, "
        "weight_transfer_backend, weight_transfer_chunk_bytes, weight_transfer_timeout, serve_module, "
        "worker_extension_cls, device, enable_reasoning, reasoning_parser",
    ),
    (
        "trl.generation_kwargs.stop_token_id",
        "trl.generation_kwargs.stop_token_id: unknown key, did you mean 'stop_token_ids'?",
    ),
    (
        "trl.generation_kwargs.temperature",
        "trl.generation_kwargs.temperature: not a generation_kwargs key; set trl.temperature instead",
    ),
    (
        "trl.generation_kwargs.max_tokens",
        "trl.generation_kwargs.max_tokens: not a generation_kwargs key; set trl.max_completion_length instead",
    ),
    ("trl.generation_kwargs.seed", f"trl.generation_kwargs.seed: {GENERATION_KWARGS_ONLY}"),
]


@pytest.mark.parametrize("key, expected", UNKNOWN_KEYS, ids=[k for k, _ in UNKNOWN_KEYS])
def test_unknown_keys(tmp_path, key, expected):
    assert problems(tmp_path, config(**{key: 1})) == [expected]


def test_unknown_trl_key_from_an_override(tmp_path):
    lines = problems(tmp_path, config(), ("--trl.tempreature=1.0",))
    assert lines == ["trl.tempreature: unknown key, did you mean 'temperature'?"]


def test_overrides_reach_typed_sections(tmp_path):
    cfg = load(tmp_path, config(), ("--trl.scale_rewards=false", "--vllm.port=9000", "--trl.top_k=20"))
    assert (cfg.trl.scale_rewards, cfg.vllm.port, cfg.trl.top_k) == ("none", 9000, 20)


# ----------------------------------------------------------------------------------------------
# TRL keys ebft cannot honour: accepted when off, an error otherwise

OFF_VALUES = {
    "beta": 0.0,
    "sync_ref_model": False,
    "ref_model_sync_steps": 0,
    "vllm_enable_sleep_mode": None,
    "use_liger_loss": False,
    "reward_funcs": [],
    "reward_weights": None,
    "rollout_func": None,
    "vllm_guided_decoding_regex": None,
    "generation_batch_size": None,
    "off_policy_mask_threshold": None,
    "replay_buffer_size": 0,
}
ON_VALUES = {
    "beta": 0.04,
    "sync_ref_model": True,
    "ref_model_sync_steps": 512,
    "vllm_enable_sleep_mode": True,
    "use_liger_loss": True,
    "reward_funcs": ["accuracy"],
    "reward_weights": [1.0],
    "rollout_func": "my_rollouts.run",
    "vllm_guided_decoding_regex": "[a-z]+",
    "generation_batch_size": 16,
    "off_policy_mask_threshold": 0.5,
    "replay_buffer_size": 100,
}


def test_the_unsupported_table_is_covered():
    assert set(OFF_VALUES) == set(ON_VALUES) == set(UNSUPPORTED_TRL_KEYS)
    assert not set(UNSUPPORTED_TRL_KEYS) & set(TrlSection.model_fields)


def test_unsupported_trl_keys_when_off_are_accepted_and_dropped(tmp_path):
    cfg = load(tmp_path, config(trl={**OFF_VALUES, "beta": None}))
    assert cfg.trl == TrlSection() and config_warnings(cfg) == []
    cfg = load(tmp_path, config(trl=dict(OFF_VALUES)))
    assert cfg.trl == TrlSection() and config_warnings(cfg) == []
    assert not set(yaml.safe_load(dump_config(cfg))["trl"]) & set(UNSUPPORTED_TRL_KEYS)


@pytest.mark.parametrize("key", sorted(UNSUPPORTED_TRL_KEYS))
def test_unsupported_trl_key_when_on_is_an_error(tmp_path, key):
    value = ON_VALUES[key]
    expected = f"trl.{key}: {UNSUPPORTED_TRL_KEYS[key]} (got {value!r})"
    assert problems(tmp_path, config(**{f"trl.{key}": value})) == [expected]


# Every key of axolotl's TRLConfig and VllmConfig schemas, in their order there: axolotl 0.19.0 as installed
# from PyPI (axolotl/utils/schemas/trl.py, vllm.py).
AXOLOTL_TRL_KEYS = [
    "beta",
    "max_completion_length",
    "use_vllm",
    "vllm_mode",
    "vllm_server_host",
    "vllm_server_port",
    "vllm_server_timeout",
    "vllm_guided_decoding_regex",
    "reward_funcs",
    "reward_weights",
    "generation_batch_size",
    "num_generations",
    "log_completions",
    "num_completions_to_print",
    "importance_sampling_level",
    "sync_ref_model",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    "scale_rewards",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "generation_kwargs",
    "chat_template_kwargs",
    "num_iterations",
    "epsilon",
    "epsilon_high",
    "use_liger_loss",
    "loss_type",
    "mask_truncated_completions",
    "entropy_coef",
    "use_adaptive_entropy",
    "entropy_target",
    "entropy_coef_delta",
    "entropy_coef_min",
    "entropy_coef_max",
    "vllm_importance_sampling_clip_min",
    "vllm_importance_sampling_clip_max",
    "log_multimodal",
    "vllm_enable_sleep_mode",
    "rollout_func",
    "multi_objective_aggregation",
    "use_data_producer",
    "async_prefetch",
    "prefetch_depth",
    "vllm_sync_interval",
    "streaming_partial_batch",
    "streaming_min_groups",
    "vllm_importance_sampling_correction",
    "vllm_importance_sampling_mode",
    "vllm_importance_sampling_cap",
    "off_policy_mask_threshold",
    "use_bias_correction_kl",
    "reward_num_workers",
    "replay_buffer_size",
    "replay_recompute_logps",
    "reroll_start_fraction",
    "reroll_max_groups",
    "skip_zero_advantage_batches",
    "vllm_lora_sync",
]
AXOLOTL_VLLM_KEYS = [
    "device",
    "tensor_parallel_size",
    "data_parallel_size",
    "gpu_memory_utilization",
    "dtype",
    "max_model_len",
    "enable_prefix_caching",
    "host",
    "port",
    "enable_reasoning",
    "reasoning_parser",
    "enforce_eager",
    "serve_module",
    "worker_extension_cls",
]


# axolotl 0.19.0's EBFTConfig (axolotl/utils/schemas/config.py): each key, and the values of its Literal keys.
AXOLOTL_EBFT_KEYS = [
    "feature_layers",
    "embed_method",
    "use_whitening",
    "alignment_coef",
    "diversity_coef",
    "ce_coef",
    "adaptive_max_tokens",
    "gt_length_multiplier",
    "mode",
    "stride",
    "context_length",
    "generate_max_len",
    "n_samples_per_prompt",
    "temperature",
    "top_p",
    "rl_coef",
    "advantage_estimator",
    "min_completion_prefix",
]
AXOLOTL_EBFT_CHOICES = {
    "embed_method": ("last_token", "mean_pooling", "completion_mean", "concat"),
    "mode": ("structured", "strided"),
    "advantage_estimator": ("rloo", "group_norm", "reinforce"),
}


def test_every_axolotl_trl_and_vllm_key_has_exactly_one_treatment():
    """Honoured (a field), accepted only when off, only for some values, or ignored with a warning."""
    trl_tables = [set(TrlSection.model_fields), set(UNSUPPORTED_TRL_KEYS), set(LIMITED_TRL_KEYS), set(IGNORED_TRL_KEYS)]
    for key in AXOLOTL_TRL_KEYS:
        assert sum(key in table for table in trl_tables) == 1, key
    vllm_tables = [set(VllmSection.model_fields), set(IGNORED_VLLM_KEYS)]
    for key in AXOLOTL_VLLM_KEYS:
        assert sum(key in table for table in vllm_tables) == 1, key
    # The tables hold nothing axolotl does not have (a stale name would hide a renamed key).
    tables = set(UNSUPPORTED_TRL_KEYS) | set(LIMITED_TRL_KEYS) | set(IGNORED_TRL_KEYS)
    assert tables - set(AXOLOTL_TRL_KEYS) == set() and set(IGNORED_VLLM_KEYS) - set(AXOLOTL_VLLM_KEYS) == set()


def test_every_axolotl_ebft_key_and_value_is_a_field_of_ebfts():
    assert [key for key in AXOLOTL_EBFT_KEYS if key not in EbftSection.model_fields] == []
    for key, values in AXOLOTL_EBFT_CHOICES.items():
        assert set(values) <= set(get_args(EbftSection.model_fields[key].annotation)), key


@pytest.mark.parametrize("value", [0.0, 0.01])
def test_entropy_bonus_is_ignored_with_a_warning_like_axolotls_ebft(tmp_path, value):
    cfg = load(tmp_path, config(**{"trl.entropy_coef": value, "trl.use_adaptive_entropy": False}))
    assert cfg.trl == TrlSection()
    assert [line.split(";")[0] for line in config_warnings(cfg)] == [
        "trl.entropy_coef: ignored",
        "trl.use_adaptive_entropy: ignored",
    ]
    assert "neither does ebft" in config_warnings(cfg)[0]


@pytest.mark.parametrize("key", sorted(IGNORED_TRL_KEYS))
def test_every_ignored_trl_key_warns_once_and_is_dropped(tmp_path, key):
    cfg = load(tmp_path, config(**{f"trl.{key}": 3}))
    assert config_warnings(cfg) == [f"trl.{key}: ignored; {IGNORED_TRL_KEYS[key]}"]
    assert key not in yaml.safe_load(dump_config(cfg))["trl"]
    assert config_warnings(load(tmp_path, config(**{f"trl.{key}": None}))) == []


@pytest.mark.parametrize("key", sorted(LIMITED_TRL_KEYS))
def test_limited_trl_keys_take_what_ebft_does_and_refuse_the_rest(tmp_path, key):
    accepted, why = LIMITED_TRL_KEYS[key]
    for value in (None, *accepted):
        assert config_warnings(load(tmp_path, config(**{f"trl.{key}": value}))) == []
    other = {"importance_sampling_level": "sequence", "vllm_importance_sampling_mode": "sequence_mask"}.get(key, 4)
    assert problems(tmp_path, config(**{f"trl.{key}": other})) == [f"trl.{key}: {why} (got {other!r})"]


@pytest.mark.parametrize("key", sorted(IGNORED_VLLM_KEYS))
def test_axolotl_server_keys_warn_that_ebfts_server_is_used(tmp_path, key):
    cfg = load(tmp_path, config(**{f"vllm.{key}": "axolotl.scripts.vllm_serve_lora"}))
    assert config_warnings(cfg) == [f"vllm.{key}: ignored; {IGNORED_VLLM_KEYS[key]}"]
    assert cfg.vllm == VllmSection()


def test_serve_module_names_what_runs_instead(tmp_path):
    cfg = load(tmp_path, config(**{"vllm.serve_module": "axolotl.scripts.vllm_serve_lora"}))
    assert config_warnings(cfg) == [
        "vllm.serve_module: ignored; `ebft vllm-serve CFG` starts vLLM's own OpenAI-compatible server (LoRA "
        "hot-loading, or weight transfer), not this module"
    ]


def test_null_vllm_settings_are_vllms_defaults(tmp_path):
    # axolotl writes an unset server setting as null (its tensor_parallel_size defaults to None).
    nulls = {f"vllm.{key}": None for key in ("tensor_parallel_size", "gpu_memory_utilization", "dtype", "port")}
    assert load(tmp_path, config(**nulls)).vllm == VllmSection()


def test_weight_transfer_settings_without_full_weight_sync_warn(tmp_path):
    changes = {"vllm.weight_transfer_timeout": 5.0, "trl.use_vllm": True, "trl.vllm_lora_sync": True, **LORA}
    assert config_warnings(load(tmp_path, config(**changes))) == [
        "vllm.weight_transfer_timeout: has no effect without trl.use_vllm: true and trl.vllm_lora_sync: false"
    ]
    changes["trl.vllm_lora_sync"] = False
    assert config_warnings(load(tmp_path, config(**changes))) == []


def test_beta_reason_names_the_missing_kl_term(tmp_path):
    assert problems(tmp_path, config(**{"trl.beta": 0.1})) == [
        "trl.beta: EBFT has no reference-model KL penalty; the feature-matching reward plays that role (got 0.1)"
    ]


def test_unsupported_trl_key_is_reported_with_other_problems(tmp_path):
    lines = problems(tmp_path, config(**{"trl.beta": 0.1, "trl.top_p": 0.0}), ("--trl.sync_ref_model=true",))
    assert [line.split(":")[0] for line in lines] == ["trl.beta", "trl.sync_ref_model", "trl.top_p"]


# ----------------------------------------------------------------------------------------------
# Cross-field checks (structured mode only)


CROSS_FIELD = {
    "groups do not divide the step": (
        {"micro_batch_size": 3, "gradient_accumulation_steps": 1},
        "micro_batch_size: micro_batch_size * gradient_accumulation_steps = 3 * 1 must be a multiple of "
        "trl.num_generations = 4",
    ),
    "one generation": (
        {"trl.num_generations": 1},
        "trl.num_generations: must be >= 2 in structured mode: group advantages compare the completions of one "
        "prompt (got 1)",
    ),
    "completion fills the sequence": (
        {"trl.max_completion_length": 2048},
        "trl.max_completion_length: must be less than sequence_len = 2048 to leave room for the prompt (got 2048)",
    ),
    "lora sync without lora": (
        {"trl.use_vllm": True, "trl.vllm_lora_sync": True},
        "trl.vllm_lora_sync: needs adapter: lora (it hot-loads a saved adapter); to fine-tune all weights set "
        "vllm_lora_sync: false and they are sent with vLLM's weight transfer (got adapter: null)",
    ),
    "async without vllm": (
        {"trl.async_prefetch": True},
        "trl.async_prefetch: needs trl.use_vllm: true; with transformers generate the rollouts run on the "
        "training device, so there is nothing to overlap with training",
    ),
    "server context too short": (
        {"vllm.max_model_len": 1024},
        "vllm.max_model_len: must be >= sequence_len = 2048, or the server rejects the longest prompt + "
        "completion (got 1024)",
    ),
    "epsilon_high below epsilon": (
        {"trl.epsilon_high": 0.1},
        "trl.epsilon_high: must be >= trl.epsilon = 0.2 (got 0.1)",
    ),
}


@pytest.mark.parametrize("changes, expected", CROSS_FIELD.values(), ids=CROSS_FIELD.keys())
def test_structured_cross_field_checks(tmp_path, changes, expected):
    assert problems(tmp_path, config(**changes)) == [expected]


@pytest.mark.parametrize("changes", [c for c, _ in CROSS_FIELD.values()], ids=CROSS_FIELD.keys())
def test_cross_field_checks_do_not_apply_in_strided_mode(tmp_path, changes):
    cfg = load(tmp_path, config(**{**changes, "ebft.mode": "strided"}))
    assert cfg.ebft.mode == "strided"


@pytest.mark.parametrize("changes", [{}, LORA], ids=["full fine-tuning", "lora"])
def test_vllm_without_lora_sync_is_full_weight_sync(tmp_path, changes):
    # axolotl's default (vllm_lora_sync: false) sends the full, LoRA-merged weights with vLLM's weight transfer.
    cfg = load(tmp_path, config(**{"trl.use_vllm": True, **changes}))
    assert (cfg.trl.use_vllm, cfg.trl.vllm_lora_sync, cfg.adapter) == (True, False, changes.get("adapter"))
    assert config_warnings(cfg) == []


@pytest.mark.parametrize(
    "changes",
    [
        {"trl.max_completion_length": 2047},
        {"vllm.max_model_len": 2048},
        {"trl.epsilon_high": 0.2},
        {"trl.num_generations": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 1},
        {"trl.use_vllm": True, "trl.vllm_lora_sync": True, "trl.async_prefetch": True, **LORA},
    ],
)
def test_cross_field_boundaries_are_accepted(tmp_path, changes):
    assert config_warnings(load(tmp_path, config(**changes))) == []


# ----------------------------------------------------------------------------------------------
# Warnings that follow from the values

NO_VLLM = "has no effect without trl.use_vllm: true"

WARNINGS = {
    "trl in strided mode": (
        {"ebft.mode": "strided", "trl.temperature": 1.0},
        ["trl: used only in structured mode; ignored in strided mode"],
    ),
    "vllm in strided mode": (
        {"ebft.mode": "strided", "vllm.port": 9000},
        ["vllm: used only in structured mode; ignored in strided mode"],
    ),
    # Compared by value: writing the defaults out (as dump_config does) is not "using" the block.
    "default trl written in strided mode": ({"ebft.mode": "strided", "trl.num_generations": 4}, []),
    # In strided mode the block warning covers the trl keys; no per-key structured warnings.
    "structured-mode trl warning keys in strided mode": (
        {"ebft.mode": "strided", "trl.repetition_penalty": 1.2, "trl.use_data_producer": True},
        ["trl: used only in structured mode; ignored in strided mode"],
    ),
    "ebft samples in structured mode": (
        {"ebft.n_samples_per_prompt": 8},
        ["ebft.n_samples_per_prompt: used only in strided mode; structured mode uses trl.num_generations"],
    ),
    "ebft temperature in structured mode": (
        {"ebft.temperature": 1.0},
        ["ebft.temperature: used only in strided mode; structured mode uses trl.temperature"],
    ),
    "ebft top_p in structured mode": (
        {"ebft.top_p": 0.9},
        ["ebft.top_p: used only in strided mode; structured mode uses trl.top_p"],
    ),
    "ebft advantage estimator in structured mode": (
        {"ebft.advantage_estimator": "group_norm"},
        ["ebft.advantage_estimator: used only in strided mode; structured mode uses trl.scale_rewards"],
    ),
    "strided layout in structured mode": (
        {"ebft.context_length": 16},
        ["ebft.context_length: used only in strided mode; ignored in structured mode"],
    ),
    "repetition penalty": (
        {"trl.repetition_penalty": 1.1},
        [
            "trl.repetition_penalty: completions are sampled with the penalty but scored without it (like TRL), "
            "so the policy gradient is slightly off-policy"
        ],
    ),
    # Structured log-probabilities are taken under the same truncation, so no off-policy warning.
    "truncated sampling": ({"trl.top_k": 50, "trl.min_p": 0.05, "trl.top_p": 0.9}, []),
    "data producer": (
        {"trl.use_data_producer": True},
        [
            "trl.use_data_producer: not needed; ebft always builds each rollout batch inside its own training "
            "loop (sync and async alike)"
        ],
    ),
    "data producer off": ({"trl.use_data_producer": False}, []),
    "streaming partial batch": (
        {"trl.streaming_partial_batch": True},
        ["trl.streaming_partial_batch: no effect; ebft scores each rollout batch once it is complete"],
    ),
    "completions to print without logging": (
        {"trl.num_completions_to_print": 2},
        ["trl.num_completions_to_print: has no effect without trl.log_completions: true"],
    ),
    "completions to print with logging": ({"trl.num_completions_to_print": 2, "trl.log_completions": True}, []),
    "vllm keys without vllm": (
        {
            "trl.vllm_server_host": "10.0.0.2",
            "trl.vllm_server_port": 8001,
            "trl.vllm_server_timeout": 60.0,
            "trl.vllm_lora_sync": True,
            "trl.vllm_sync_interval": 2,
            "trl.vllm_importance_sampling_correction": False,
            "trl.vllm_importance_sampling_cap": 2.0,
            "trl.vllm_importance_sampling_clip_min": 0.4,
        },
        [
            f"trl.vllm_server_host: {NO_VLLM}",
            f"trl.vllm_server_port: {NO_VLLM}",
            f"trl.vllm_server_timeout: {NO_VLLM}",
            f"trl.vllm_lora_sync: {NO_VLLM}",
            f"trl.vllm_sync_interval: {NO_VLLM}",
            f"trl.vllm_importance_sampling_correction: {NO_VLLM}",
            f"trl.vllm_importance_sampling_cap: {NO_VLLM}",
            f"trl.vllm_importance_sampling_clip_min: {NO_VLLM}",
        ],
    ),
    "vllm keys with vllm": (
        {
            "trl.use_vllm": True,
            "trl.vllm_server_host": "10.0.0.2",
            "trl.vllm_lora_sync": True,
            "trl.vllm_sync_interval": 2,
            **LORA,
        },
        [],
    ),
}


@pytest.mark.parametrize("changes, expected", WARNINGS.values(), ids=WARNINGS.keys())
def test_value_warnings(tmp_path, changes, expected):
    assert config_warnings(load(tmp_path, config(**changes))) == expected


# ----------------------------------------------------------------------------------------------
# dump_config round trip

NON_DEFAULT = {
    "trl": {
        "num_generations": 8,
        "max_completion_length": 128,
        "temperature": 1.0,
        "top_k": -1,
        "min_p": 0.05,
        "use_vllm": True,
        "vllm_server_host": "0.0.0.0",
        "vllm_server_port": 8100,
        "vllm_lora_sync": True,
        "vllm_sync_interval": 2,
        "async_prefetch": True,
        "scale_rewards": False,
        "loss_type": "dr_grpo",
        "epsilon_high": 0.28,
        "num_iterations": 2,
        "generation_kwargs": {"stop_token_ids": [151645, 151643]},
        "chat_template_kwargs": {"enable_thinking": False},
        "beta": 0.0,
    },
    "vllm": {"gpu_memory_utilization": 0.5, "max_model_len": 4096, "dtype": "bfloat16", "enforce_eager": True},
    "micro_batch_size": 8,
    "gradient_accumulation_steps": 1,
    **LORA,
}


def test_dump_then_load_keeps_non_default_sections(tmp_path):
    cfg = load(tmp_path, {**STRUCTURED, **NON_DEFAULT})
    assert (cfg.trl.top_k, cfg.trl.scale_rewards, cfg.trl.clip_high) == (None, "none", 0.28)
    dumped = dump_config(cfg)
    as_data = yaml.safe_load(dumped)
    assert list(as_data["trl"]) == list(TrlSection.model_fields)
    assert list(as_data["vllm"]) == list(VllmSection.model_fields)
    assert as_data["trl"]["generation_kwargs"] == {"stop_token_ids": [151645, 151643]}
    again = parse_config(as_data)
    assert again == cfg and again.trl == cfg.trl and again.vllm == cfg.vllm
    assert dump_config(again) == dumped
    assert config_warnings(again) == config_warnings(cfg) == []


def test_dump_then_load_in_strided_mode_warns_the_same(tmp_path):
    cfg = load(tmp_path, config(**{"ebft.mode": "strided", "trl.temperature": 1.0}))
    again = parse_config(yaml.safe_load(dump_config(cfg)))
    assert (
        config_warnings(again) == config_warnings(cfg) == ["trl: used only in structured mode; ignored in strided mode"]
    )


# ----------------------------------------------------------------------------------------------
# Server addresses


def _addresses(trl: dict[str, Any], vllm: dict[str, Any]) -> tuple[tuple[str, int], tuple[str, int]]:
    cfg = TrainConfig.model_validate({**STRUCTURED, "trl": trl, "vllm": vllm})
    return vllm_client_address(cfg), vllm_serve_address(cfg)


ADDRESSES = {
    "defaults": ({}, {}, ("127.0.0.1", 8000), ("127.0.0.1", 8000)),
    # The guide's quick start: only the trl keys, with a bind-all host.
    "trl bind-all host": (
        {"vllm_server_host": "0.0.0.0", "vllm_server_port": 8001},
        {},
        ("127.0.0.1", 8001),
        ("0.0.0.0", 8001),
    ),
    "vllm bind-all host": ({}, {"host": "0.0.0.0", "port": 9000}, ("127.0.0.1", 9000), ("0.0.0.0", 9000)),
    "vllm ipv6 bind-all host": ({}, {"host": "::"}, ("127.0.0.1", 8000), ("::", 8000)),
    "trl names a remote server": (
        {"vllm_server_host": "gpu-node-3"},
        {},
        ("gpu-node-3", 8000),
        ("gpu-node-3", 8000),
    ),
    # Both set: training connects where trl says, the server binds where vllm says.
    "both set": (
        {"vllm_server_host": "10.1.2.3", "vllm_server_port": 8100},
        {"host": "0.0.0.0", "port": 9000},
        ("10.1.2.3", 8100),
        ("0.0.0.0", 9000),
    ),
    "only the port in trl": ({"vllm_server_port": 8200}, {"host": "10.0.0.7"}, ("10.0.0.7", 8200), ("10.0.0.7", 8200)),
}


@pytest.mark.parametrize("trl, vllm, client, serve", ADDRESSES.values(), ids=ADDRESSES.keys())
def test_vllm_addresses(trl, vllm, client, serve):
    assert _addresses(trl, vllm) == (client, serve)


# ----------------------------------------------------------------------------------------------
# The guide's structured quick start loads unchanged


def test_guide_quickstart_loads_with_its_values(tmp_path):
    path = tmp_path / "ebft_quickstart.yaml"
    path.write_text(GUIDE_QUICKSTART, encoding="utf-8")
    cfg = load_config(path)
    t = cfg.trl
    assert (t.num_generations, t.max_completion_length, t.temperature) == (4, 256, 0.7)
    assert (t.use_vllm, t.vllm_server_host, t.vllm_server_port) == (True, "0.0.0.0", 8000)
    assert (t.vllm_lora_sync, t.vllm_sync_interval, t.use_data_producer, t.async_prefetch) == (True, 3, True, False)
    assert (t.scale_rewards, t.loss_type) == ("group", "grpo")
    assert cfg.vllm == VllmSection(gpu_memory_utilization=0.5, max_model_len=1024)
    assert vllm_client_address(cfg) == ("127.0.0.1", 8000)
    assert vllm_serve_address(cfg) == ("0.0.0.0", 8000)
    assert config_warnings(cfg) == [
        "flash_attention: read as attn_implementation: flash_attention_2 (axolotl's older spelling)",
        "trl.use_data_producer: not needed; ebft always builds each rollout batch inside its own training loop "
        "(sync and async alike)",
    ]
    again = parse_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    assert config_warnings(again) == config_warnings(cfg)[1:]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--gradient_accumulation_steps=1", "micro_batch_size: micro_batch_size * gradient_accumulation_steps = 2 * 1"),
        ("--adapter=null", "trl.vllm_lora_sync: needs adapter: lora"),
        ("--vllm.max_model_len=512", "vllm.max_model_len: must be >= sequence_len = 1024"),
        ("--trl.vllm_mode=colocate", f"trl.vllm_mode: {COLOCATE}"),
    ],
)
def test_guide_quickstart_with_one_change_is_rejected(tmp_path, override, expected):
    path = tmp_path / "ebft_quickstart.yaml"
    path.write_text(GUIDE_QUICKSTART, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, (override,))
    lines = [line.strip() for line in str(info.value).splitlines()[1:]]
    assert len(lines) == 1 and lines[0].startswith(expected), lines

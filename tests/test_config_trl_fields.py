"""ebft.config's typed ``trl:`` and ``vllm:`` blocks: defaults, per-field constraints and edge values, and
unknown keys (the closest valid key, or what to use instead).
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from trl_config_builders import COLOCATE, STRUCTURED, config, load, problems

from ebft.config import (
    GenerationKwargs,
    TrainConfig,
    TrlSection,
    VllmSection,
    config_warnings,
    dump_config,
    parse_config,
)

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

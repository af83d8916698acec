"""ebft.config against axolotl's TRL, vLLM and EBFT schemas: every key has exactly one treatment (a field,
ignored with a warning, limited, or unsupported), and TRL keys ebft cannot honour are refused when on.
"""

from __future__ import annotations

from typing import get_args

import pytest
import yaml
from trl_config_builders import LORA, config, load, problems

from ebft.config import (
    IGNORED_TRL_KEYS,
    IGNORED_VLLM_KEYS,
    LIMITED_TRL_KEYS,
    UNSUPPORTED_TRL_KEYS,
    EbftSection,
    TrlSection,
    VllmSection,
    config_warnings,
    dump_config,
)

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

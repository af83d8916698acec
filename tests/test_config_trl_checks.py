"""ebft.config's structured-mode checks across the ``trl:`` and ``vllm:`` blocks: cross-field errors, warnings
that follow from the values, the dump round trip, server addresses, and the guide's quick start.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from trl_config_builders import COLOCATE, LORA, STRUCTURED, config, load, problems

from ebft.config import (
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

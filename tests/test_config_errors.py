"""ebft.config: every way to get a config or a config file wrong gives its one clear error; unsupported and
ignored axolotl keys.
"""

from __future__ import annotations

import pytest
import yaml
from config_loading import DELETE, config, error, load, write

from ebft.config import (
    IGNORED_AXOLOTL_KEYS,
    UNSUPPORTED_AXOLOTL_KEYS,
    TrainConfig,
    config_warnings,
    dump_config,
    load_config,
)
from ebft.errors import ConfigError

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
    "missing rl": ({"rl": DELETE}, ["rl: required: add `rl: ebft`"]),
    "other rl": ({"rl": "grpo"}, ["rl: must be 'ebft'"]),
    "missing ebft": ({"ebft": DELETE}, ["ebft: the `ebft:` section is required when rl: ebft"]),
    "null ebft": ({"ebft": None}, ["ebft: the `ebft:` section is required when rl: ebft"]),
    "missing base_model": ({"base_model": DELETE}, ["base_model: required"]),
    "missing dataset path": ({"datasets.0.path": DELETE}, ["datasets.0.path: required key is missing"]),
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

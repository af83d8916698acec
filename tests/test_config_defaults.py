"""ebft.config: documented defaults (the guide's reference tables, the root defaults), value warnings, and the
dump_config / to_dict round trip.
"""

from __future__ import annotations

import pytest
import yaml
from config_loading import (
    AXOLOTL_STRIDED_FFT,
    AXOLOTL_STRIDED_PRETRAIN,
    GUIDE_STRIDED,
    GUIDE_STRUCTURED,
    config,
    load,
    write,
)

from ebft.config import (
    IGNORED_AXOLOTL_KEYS,
    DatasetSpec,
    EbftSection,
    TrainConfig,
    TrlSection,
    VllmSection,
    config_warnings,
    dump_config,
    load_config,
)

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

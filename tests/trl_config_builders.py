"""Shared builders of the ``trl:``/``vllm:`` config tests: a structured config without warnings, changed by
dotted keys, and loading it from a YAML file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from ebft.config import TrainConfig, load_config
from ebft.errors import ConfigError

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
    """Write data to cfg.yaml under tmp_path and load it with the overrides."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_config(path, overrides)


def problems(tmp_path: Path, data: dict[str, Any], overrides: tuple[str, ...] = ()) -> list[str]:
    """The problem lines of the ConfigError that loading ``data`` raises."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data, overrides)
    return [line.strip() for line in str(info.value).splitlines()[1:]]


# The problem line of trl.vllm_mode: colocate.
COLOCATE = "ebft runs vLLM as a separate server (`ebft vllm-serve CFG`); colocate mode is not supported"

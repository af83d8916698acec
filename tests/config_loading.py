"""Shared builders of the config tests: a minimal strided config changed by dotted keys, written to YAML and
loaded, or the error loading it raises.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from ebft.config import TrainConfig, load_config
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

# A value for config() that removes the key instead of setting it.
DELETE = object()


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    """Write text to tmp_path / name and return the path."""
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
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return data


def load(tmp_path: Path, data: dict[str, Any], overrides: tuple[str, ...] = ()) -> TrainConfig:
    """Write data as YAML and load it with the overrides."""
    return load_config(write(tmp_path, yaml.safe_dump(data)), overrides)


def error(tmp_path: Path, data: dict[str, Any], overrides: tuple[str, ...] = ()) -> str:
    """The message of the ConfigError that loading data raises."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data, overrides)
    return str(info.value)

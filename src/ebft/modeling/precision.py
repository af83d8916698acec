"""Numeric precision: bf16 autocast where the config and the device allow it, and the dtypes weights are stored in.

Three dtypes follow from the config (docs/guide.md, "Precision and memory"):

* the policy's weights (``policy_dtype``): ``torch_dtype`` when set. Unset, full fine-tuning keeps fp32
  master weights (autocast supplies the bf16 compute) and LoRA stores its frozen base in bf16 when bf16 is
  on. With ``torch_dtype: bfloat16`` and no adapter the *trained* weights are bf16, and so are their
  gradients and AdamW's moments (torch keeps optimizer state in the parameter dtype): half the bytes of
  fp32 master weights, at the cost of rounding every update to bf16. LoRA adapters stay fp32 whatever
  the base is stored in (PEFT upcasts them).
* the compute (``autocast_dtype``): bf16 autocast when ``bf16`` says so, else none.
* a separate frozen copy of the feature network (``feature_dtype``): bf16 whenever the run computes in
  bf16 (as axolotl stores its copy on CUDA), else the policy's weight dtype.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch

# torch_dtype values the config accepts, by name.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class PrecisionSettings(Protocol):
    """The config keys precision reads (a TrainConfig has them all)."""

    @property
    def torch_dtype(self) -> str | None: ...
    @property
    def bf16(self) -> bool | str: ...
    @property
    def adapter(self) -> str | None: ...
    @property
    def load_in_4bit(self) -> bool: ...
    @property
    def load_in_8bit(self) -> bool: ...
    @property
    def optimizer(self) -> str: ...


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """``bf16: auto`` means bf16 only where the device runs it natively (CUDA with bf16 support)."""
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(setting)


def configured_dtype(cfg: PrecisionSettings) -> torch.dtype | None:
    """The config's ``torch_dtype`` as a torch dtype, None when unset."""
    name = cfg.torch_dtype
    return None if name is None else DTYPES[name]


def policy_dtype(cfg: PrecisionSettings, device: torch.device) -> torch.dtype:
    """The dtype the policy's weights are stored in (the frozen base's, with LoRA); see the module docstring."""
    return run_dtypes(cfg, use_bf16(cfg.bf16, device))[0]


def autocast_dtype(cfg: PrecisionSettings, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the config asks for it (see ``use_bf16``), else none (fp32)."""
    return torch.bfloat16 if use_bf16(cfg.bf16, device) else None


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; with ``dtype`` None no autocast (the weights' dtype)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def feature_dtype(cfg: PrecisionSettings, device: torch.device) -> torch.dtype:
    """The dtype of a separate frozen copy of the feature network (``device``: the policy's)."""
    return run_dtypes(cfg, use_bf16(cfg.bf16, device))[2]


def run_dtypes(cfg: PrecisionSettings, bf16: bool) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(policy weights, compute, frozen feature copy) when bf16 is on (``bf16``) or off; the module
    docstring says why each is what it is. Planning for a device that is not here passes ``bf16`` itself."""
    weights = configured_dtype(cfg)
    if weights is None:
        weights = torch.bfloat16 if (bf16 and cfg.adapter is not None) else torch.float32
    compute = torch.bfloat16 if bf16 else weights
    return weights, compute, torch.bfloat16 if compute == torch.bfloat16 else weights


def describe(cfg: PrecisionSettings, bf16: bool) -> str:
    """One line on the run's precision (bf16 on or off), for the log: weights, optimizer state, compute."""
    weights, compute, _ = run_dtypes(cfg, bf16)
    source = "torch_dtype" if configured_dtype(cfg) is not None else "default"
    compute_text = "bfloat16 autocast" if bf16 else f"{dtype_name(compute)} (no autocast)"
    if cfg.adapter is not None:
        base = "4-bit" if cfg.load_in_4bit else "8-bit" if cfg.load_in_8bit else dtype_name(weights)
        trained = f"frozen base {base} ({source}), LoRA adapters float32"
        state_dtype = torch.float32
    else:
        master = "" if weights == torch.float32 else ", no float32 master copy"
        trained = f"trained weights {dtype_name(weights)} ({source}{master})"
        state_dtype = weights
    if cfg.optimizer == "sgd":
        state = "SGD keeps no optimizer state"
    else:
        state = f"AdamW moments {dtype_name(state_dtype)} (the parameter dtype)"
    return f"precision: {trained}; gradients in the parameter dtype; {state}; compute {compute_text}"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")

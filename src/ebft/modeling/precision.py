"""Numeric precision: bf16 autocast where the config and the device allow it, and the dtype weights are stored in."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """``bf16: auto`` means bf16 only where the device runs it natively (CUDA with bf16 support)."""
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(setting)


def policy_dtype(cfg, device: torch.device) -> torch.dtype:
    """The dtype the policy's weights are stored in.

    Full fine-tuning keeps fp32 master weights (autocast supplies bf16 compute); LoRA freezes the base,
    so it can be stored in bf16 while the adapters stay fp32.
    """
    return torch.bfloat16 if (use_bf16(cfg.bf16, device) and cfg.adapter is not None) else torch.float32


def autocast_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the config asks for it (see ``use_bf16``), else none (fp32)."""
    return torch.bfloat16 if use_bf16(cfg.bf16, device) else None


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; with ``dtype`` None no autocast (the weights' dtype)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)

"""Sampling through LoRA weights merged into a temporary copy of the base matrices.

Structured rollouts decode one token per model call, every adapted linear layer on a few rows. Unmerged, each
layer costs the base product plus four small operations (A x, B (A x), the scale, the sum), whose fixed cost
per call is what a few rows pay for. Merged, the layer computes x (W + s B A)^T, the same linear map (equal up
to fp32 rounding), in one product. Measured on a CPU with 8 rows (benchmarks/RESULTS.md): a decoding step 27%
faster on the 5.6M-parameter Llama, 8% on SmolLM2-135M, where the merge itself (one ``addmm`` per layer, once
per rollout batch) takes back part of it. Strided rollouts make only g model calls of n x K rows each, too few
to repay the merge, and keep their adapters as they are.

The base weights are never modified: each adapted layer's weight points at ``W + s B A``, a new tensor, for the
duration and at the original tensor again afterwards (on error too), so the frozen feature network, which
reads the same base weights under ``disable_adapter``, and the optimizer see exactly what they saw before.
The copy costs the adapted matrices' bytes once more while sampling (the memory plan counts it).

Merging is used only where it computes what the model defines to fp32 rounding: plain LoRA on ``nn.Linear``
layers with fp32 weights and no autocast. In bf16 a small s B A would be lost in the rounding of W + s B A
(8-bit mantissa), so bf16 weights or autocast, DoRA and other variants, bias-carrying adapters, quantised or
sharded (FSDP2) bases, and extra trained modules (``modules_to_save``, ``trainable_token_indices``: a warm
start's adapter may carry them) sample through the adapters as they are (``merge_reason`` says why).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _lora_layers(model: nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def merge_reason(model: Any, autocast_dtype: torch.dtype | None = None) -> str | None:
    """Why sampling keeps ``model``'s adapters unmerged; None when ``merged_for_sampling`` merges them.
    ``model``: any module (a PEFT model is recognised by its ``peft_config`` and ``disable_adapter``)."""
    if not hasattr(model, "disable_adapter") or not hasattr(model, "peft_config"):
        return "not a PEFT model"
    if autocast_dtype is not None:
        return f"autocast to {autocast_dtype} (s B A would be rounded into W)"
    config = model.peft_config.get(getattr(model, "active_adapter", None))
    if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA":
        return "not a LoRA adapter"
    # disable_adapter would switch these off too, and they are not merged.
    for key in ("modules_to_save", "trainable_token_indices"):
        if getattr(config, key, None):
            return f"{key} train outside the adapters"
    from peft.tuners.lora import Linear

    layers = _lora_layers(model)
    if not layers:
        return "no LoRA layers"
    for layer in layers:
        if type(layer) is not Linear:
            return f"{type(layer).__name__} adapters (only nn.Linear LoRA merges)"
        base = layer.get_base_layer()
        if layer.fan_in_fan_out or type(base) is not nn.Linear or type(base.weight.data) is not torch.Tensor:
            return f"a {type(base).__name__} base layer with {type(base.weight.data).__name__} weights"
        if base.weight.dtype != torch.float32:
            return f"{base.weight.dtype} base weights (s B A would be rounded into W)"
        for name in layer.active_adapters:
            if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
                return "a LoRA variant (DoRA, ...)"
            if layer.lora_bias.get(name, False):
                return "adapters with a bias"
    return None


@contextmanager
def merged_for_sampling(model: Any, autocast_dtype: torch.dtype | None = None) -> Iterator[bool]:
    """Within: ``model``'s adapted linear layers compute with W + s B A and their adapters switched off (yields
    True), or, where ``merge_reason`` finds a reason, nothing changes (yields False). For no-grad sampling."""
    if merge_reason(model, autocast_dtype) is not None:
        yield False
        return
    swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer in _lora_layers(model):
                active = [a for a in layer.active_adapters if a in layer.lora_A]
                if not active:
                    continue
                weight = layer.get_base_layer().weight
                merged = weight.data
                for a in active:  # W + s B A in one product, without a separate delta tensor
                    lora_a, lora_b = layer.lora_A[a].weight, layer.lora_B[a].weight
                    merged = torch.addmm(merged, lora_b, lora_a, alpha=layer.scaling[a])
                swapped.append((weight, weight.data))
                weight.data = merged
        with model.disable_adapter():
            yield True
    finally:
        for weight, original in swapped:
            weight.data = original

"""What a full-weight sync sends to the vLLM server: the policy's weights as a checkpoint holds them
(docs/design.md §6.6).

vLLM loads the tensors it is sent with its ``load_weights``, which expects the names, shapes and layout
of the model's checkpoint files. So every tensor goes out as ``save_pretrained`` would write it:

* a plain model: each parameter (a tied LM head once, under the embedding's name), passed through
  transformers' ``revert_weight_conversion``, which undoes what loading changed (renamed prefixes,
  fused MoE experts split back into one tensor per expert);
* a PEFT LoRA model: the base model's names, each adapted layer's weight merged, ``W + scale * B @ A``
  for every active adapter, into a new tensor: the base weights are never touched, because the frozen
  feature network reads them under ``disable_adapter``.

Every sync sends every weight, layer after layer, although LoRA or frozen parts do not change: vLLM
reloads checkpoint-format weights layer by layer (processing, e.g. quantising, a layer once all of its
weights have arrived), so a partial update is not something it promises to apply.

Under FSDP the caller runs all of this inside ``Sharding.gathered()``, where every parameter is a
whole tensor on every process.

Shapes: a :class:`WeightSpec` shape is the checkpoint tensor's full shape; ``Entry.tensors()`` returns
contiguous tensors of exactly its specs' shapes and dtypes, in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

from ebft.errors import ConfigError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class WeightSpec:
    """One checkpoint tensor as the server receives it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Entry:
    """One policy parameter: the checkpoint tensors it becomes (usually one) and how to make them."""

    specs: tuple[WeightSpec, ...]
    tensors: Callable[[], list[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs)


def plan_chunks(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Indices of ``sizes`` cut, in order, into runs of at most ``max_bytes`` each; an item larger than
    ``max_bytes`` goes alone. Every index appears exactly once."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    chunks: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if chunks and total + size <= max_bytes:
            chunks[-1].append(i)
            total += size
        else:
            chunks.append([i])
            total = size
    return chunks


def _is_adapter_weight(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


class _AdaptedLayer(Protocol):
    """A PEFT LoRA layer as merging reads it: every concrete one (linear, embedding, convolution) defines
    ``get_delta_weight``, which their base class ``LoraLayer`` does not declare."""

    active_adapters: list[str]
    lora_A: nn.ModuleDict

    def get_delta_weight(self, adapter: str) -> torch.Tensor: ...


def _lora_layers(hf_model: nn.Module) -> dict[str, _AdaptedLayer]:
    """``{name of the base weight inside an adapted layer: that LoRA layer}``."""
    from peft.tuners.lora import LoraLayer

    layers: dict[str, _AdaptedLayer] = {}
    for path, module in hf_model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if getattr(module, "use_dora", {}).get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
                    raise ConfigError(
                        f"full-weight sync merges plain LoRA only; {path} uses DoRA or a LoRA bias "
                        "(set trl.vllm_lora_sync: true to hot-load the adapter instead)"
                    )
            layers[f"{path}.base_layer.weight"] = cast(_AdaptedLayer, module)
    return layers


def _merged(weight: torch.Tensor, layer: _AdaptedLayer) -> torch.Tensor:
    """``weight`` plus every active adapter's delta, in fp32, as a new tensor."""
    out = weight.detach().float().clone()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {}):
            out += layer.get_delta_weight(adapter).detach().float().to(out.device)
    return out


def _checkpoint_form(hf_model: PreTrainedModel) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(state_dict name, tensor) -> {checkpoint name: tensor}``, as ``save_pretrained`` converts them."""
    from transformers.core_model_loading import revert_weight_conversion

    return lambda name, tensor: revert_weight_conversion(hf_model, {name: tensor})


def policy_entries(model: nn.Module, *, wire_dtype: torch.dtype | None) -> list[Entry]:
    """The tensors a sync of ``model`` (a causal LM, or its PEFT LoRA wrapper) sends, in a fixed order.

    wire_dtype: the dtype floating-point tensors are sent in (the server's); None keeps each one's own.
    """
    peft = hasattr(model, "peft_config")
    # A PEFT wrapper's base_model.model is the causal LM it adapts.
    hf_model = cast("PreTrainedModel", cast("PeftModel", model).base_model.model if peft else model)
    lora = _lora_layers(hf_model) if peft else {}
    convert = _checkpoint_form(hf_model)
    entries = []
    for name, param in hf_model.named_parameters():  # a tied weight once
        if peft and _is_adapter_weight(name):
            continue
        layer = lora.get(name)
        state_name = name.replace(".base_layer.", ".")
        dtype = wire_dtype if (wire_dtype is not None and param.is_floating_point()) else param.dtype
        planned = convert(state_name, torch.empty(param.shape, dtype=dtype, device="meta"))
        specs = tuple(WeightSpec(key, tuple(value.shape), value.dtype) for key, value in planned.items())

        def make(param=param, layer=layer, state_name=state_name, dtype=dtype, specs=specs) -> list[torch.Tensor]:
            with torch.no_grad():
                value = _merged(param, layer) if layer is not None else param.detach()
                out = convert(state_name, value.to(dtype))
            if [(k, tuple(v.shape), v.dtype) for k, v in out.items()] != [(s.name, s.shape, s.dtype) for s in specs]:
                # The server sizes its receive buffers from the specs it was told; a mismatch would hang it.
                raise RuntimeError(f"{state_name}: converted to {list(out)}, but {[s.name for s in specs]} was planned")
            return [v.contiguous() for v in out.values()]

        entries.append(Entry(specs, make))
    return entries

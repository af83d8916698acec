"""The parts of a causal LM that ebft drives itself: the decoder body, the output head (with what the
model does to its logits after it), and the keyword its forward takes the KV cache under."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

from ebft.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


class CausalLM(Protocol):
    """What ebft reads off a causal LM: a transformers model, or a PEFT wrapper, which forwards these to it."""

    config: PreTrainedConfig

    def get_decoder(self) -> nn.Module: ...

    def get_input_embeddings(self) -> nn.Module: ...

    def get_output_embeddings(self) -> nn.Module | None: ...


def causal_lm(model: nn.Module) -> CausalLM:
    """``model`` typed as the causal LM it is: torch types an attribute of a module as a tensor or a module,
    so ``model.get_decoder`` would read as neither callable nor the model's method."""
    return cast(CausalLM, model)


def decoder_layers(body: nn.Module) -> nn.ModuleList:
    """The decoder body's layers (``body.layers``)."""
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{type(body).__name__} has no decoder layer list (layers); it cannot be used")
    return layers


def embedding_rows(model: nn.Module) -> int:
    """Rows of the input embedding table (its vocabulary size), an ``nn.Embedding`` in transformers."""
    return cast(nn.Embedding, causal_lm(model).get_input_embeddings()).num_embeddings


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body (embeddings, layers, final norm) of a causal LM or its PEFT wrapper."""
    body = causal_lm(model).get_decoder()
    if body is None or body is model:
        raise ConfigError(f"{type(model).__name__} exposes no decoder body (get_decoder()); it cannot be used")
    return body


class ScaledHead(nn.Module):
    """The LM head followed by what the causal LM does to its logits after it: a constant factor (Cohere
    ``logit_scale``, Granite 1 / ``logits_scaling``, Falcon-H1 ``lm_head_multiplier``), then soft-capping
    (Gemma-2/3 ``final_logit_softcapping``, RecurrentGemma ``logits_soft_cap``: cap * tanh(logits / cap))."""

    def __init__(self, head: nn.Module, scale: float, cap: float | None):
        super().__init__()
        self.head, self.scale, self.cap = head, scale, cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.cap is not None:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def output_head(model: nn.Module) -> nn.Module:
    """hidden [..., H] -> logits [..., V] exactly as the causal LM computes them from its last hidden state."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no output head (get_output_embeddings()); it cannot be used")
    text = lm.config.get_text_config()
    scale = 1.0
    if getattr(text, "logit_scale", None) is not None:
        scale *= text.logit_scale
    if getattr(text, "logits_scaling", None) is not None:
        scale /= text.logits_scaling
    if getattr(text, "lm_head_multiplier", None) is not None:
        scale *= text.lm_head_multiplier
    cap = getattr(text, "final_logit_softcapping", None) or getattr(text, "logits_soft_cap", None)
    return head if scale == 1.0 and cap is None else ScaledHead(head, scale, cap)


def cache_keyword(body: nn.Module) -> str:
    """The name under which ``body.forward`` takes the KV cache: ``cache`` since transformers 5.24
    (``past_key_values`` is deprecated there, removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"

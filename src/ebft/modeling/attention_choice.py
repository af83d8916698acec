"""``attn_implementation``: the attention backend of the model's own passes, honoured where it can be.

ebft's packed passes bring their own attention (the strided rows, ``ebft.attention.strided``; structured
mode's prefix-sharing rows, ``ebft.attention.packed``) and set it only for the duration of each pass. Every
other pass (sampling with transformers, padded policy and feature passes, evaluation) runs the backend
the model was loaded with, which is this choice: transformers builds the mask each backend expects from
the 2-D padding mask ebft passes (an additive float mask for eager, never a boolean one; docs/design.md §4.8).

Each backend computes the same attention (softmax(q k^T * scale) v with the model's own mask, window and
soft-capping), so where the requested one cannot run here the closest exact one is used, with one warning
saying which: ``sdpa`` (``eager`` for a model class without an SDPA path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Backends transformers runs, and what each needs beyond torch.
EXACT = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
# axolotl's other values: kernels that ebft does not run; sdpa computes the exact attention they approximate
# (sage, fp8) or reproduce (xformers).
SUBSTITUTED = {
    "xformers": "xformers is not a transformers attention backend",
    "sage": "SageAttention (quantised attention) is not supported",
    "fp8": "fp8 attention is not supported",
}
CHOICES = (*EXACT, *SUBSTITUTED)
_FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
# The model-class flag transformers sets for each backend it implements.
_CLASS_FLAGS = {
    "sdpa": "_supports_sdpa",
    "flex_attention": "_supports_flex_attn",
    "flash_attention_2": "_supports_flash_attn",
    "flash_attention_3": "_supports_flash_attn",
}


@dataclass(frozen=True)
class AttentionChoice:
    """implementation: what ``from_pretrained`` gets (None: transformers' default, SDPA or eager);
    note: why it differs from the request (None when it does not)."""

    implementation: str | None
    note: str | None = None


def choose_attention(
    requested: str | None,
    *,
    cuda: bool,
    installed: Callable[[str], bool],
    supports: Callable[[str], bool] | None = None,
) -> AttentionChoice:
    """The backend to load the model with for ``attn_implementation: requested`` on this machine (``cuda``:
    training runs on a CUDA device; ``installed(package)``; ``supports(backend)``: whether the model class
    implements it, unknown = yes)."""
    if requested is None:
        return AttentionChoice(None)
    supports = supports or (lambda _backend: True)
    exact = "sdpa" if supports("sdpa") else "eager"
    why = None
    if requested in SUBSTITUTED:
        why = SUBSTITUTED[requested]
    elif requested in _FLASH_PACKAGES:
        package = _FLASH_PACKAGES[requested]
        missing = ([] if installed(package) else [f"the {package} package"]) + ([] if cuda else ["a CUDA GPU"])
        if missing:
            why = f"{requested} needs {' and '.join(missing)}"
    elif requested == "flex_attention" and not cuda:
        why = "flex_attention has no backward pass on CPU"
    if why is None and requested != "eager" and not supports(requested):
        why = f"this model class does not implement {requested}"
    if why is None:
        return AttentionChoice(requested)
    return AttentionChoice(exact, f"attn_implementation: {why}; using {exact}, which computes the same attention")


def model_class_support(config) -> Callable[[str], bool]:
    """``supports`` for :func:`choose_attention` from the causal-LM class of ``config`` (from its
    config.json, no weights); every backend counts as supported where the class is not known."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None:
        return lambda _backend: True
    return lambda backend: bool(getattr(cls, _CLASS_FLAGS[backend], True)) if backend in _CLASS_FLAGS else True

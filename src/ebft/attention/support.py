"""Which model architectures each mode computes exactly (docs/design.md §7), decided from the HF config alone.

The packed strided row runs every attention layer through ``ebft.attention.strided``, which applies what
transformers' attention modules pass it: the layer's scaling, its sliding window (per layer, so models
that alternate local and global layers are exact), attention logit soft-capping and grouped-query
attention; ``ebft.modeling.parts.output_head`` applies the logit scaling and final soft-capping that follow the
LM head (Cohere, Granite, Gemma). Anything else that changes
what the model computes from a prefix is refused here, before any weights load, naming the config key.

``VERIFIED`` are the model types that ``tests/test_architectures.py`` checks against per-block forwards.

Structured mode runs every causal LM: its feature and policy passes pack sequences into one row only where
``ebft.attention.packed.unsupported_reason`` finds nothing against it, and run the model's own forward over
padded sequences otherwise (recurrent and hybrid models, sliding windows, soft-capping); ``log_structured_passes``
says which, and why, once at set-up.
"""

from __future__ import annotations

import logging

from ebft.attention.packed import unsupported_reason
from ebft.errors import ConfigError

log = logging.getLogger("ebft")

VERIFIED = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "cohere",
    "cohere2",
    "granite",
)
# The model types ``tests/test_hybrid_matrix.py`` checks in structured mode, one training step against
# per-sequence forwards: the strided ones, hybrid and recurrent ones (which strided mode refuses), GPT-OSS.
STRUCTURED_VERIFIED = (
    *VERIFIED,
    "qwen3_5",
    "qwen3_5_text",
    "qwen3_next",
    "granitemoehybrid",
    "lfm2",
    "falcon_h1",
    "jamba",
    "bamba",
    "nemotron_h",
    "mamba",
    "mamba2",
    "recurrent_gemma",
    "gpt_oss",
)
HONOURED_LAYER_TYPES = ("full_attention", "sliding_attention")
# model_type -> what it computes that the strided attention does not.
REFUSED_MODEL_TYPES = {
    "gpt_oss": "attention sinks (the learned per-head `sinks` logits)",
}


def strided_problems(config) -> list[str]:
    """Reasons (one per config key) why strided mode cannot compute this model exactly; [] if it can."""
    text = config.get_text_config()
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", None)
    problems = []
    if model_type in REFUSED_MODEL_TYPES:
        problems.append(f"model_type: {model_type!r} uses {REFUSED_MODEL_TYPES[model_type]}")
    layer_types = getattr(text, "layer_types", None) or []
    others = sorted({t for t in layer_types if t not in HONOURED_LAYER_TYPES})
    if others:
        problems.append(f"layer_types: {others} (only {list(HONOURED_LAYER_TYPES)} are computed)")
    if getattr(text, "attention_chunk_size", None) is not None:
        problems.append(f"attention_chunk_size: {text.attention_chunk_size} (chunked local attention)")
    if getattr(text, "use_bidirectional_attention", False):
        problems.append("use_bidirectional_attention: true (not a causal language model)")
    if getattr(text, "num_kv_shared_layers", 0):
        problems.append(f"num_kv_shared_layers: {text.num_kv_shared_layers} (layers reusing another layer's cache)")
    return problems


def check_strided_architecture(config) -> None:
    """Raise ConfigError if strided mode cannot compute this model exactly; warn if it is not verified."""
    problems = strided_problems(config)
    # The top-level type: a multimodal wrapper around a verified text model is itself not verified.
    model_type = config.model_type
    if problems:
        raise ConfigError(
            f"base_model: ebft.mode strided cannot compute this {model_type!r} model exactly: "
            + "; ".join(problems)
            + ". "
            + _what_works(config)
        )
    if model_type not in VERIFIED:
        log.warning(
            "strided mode: model_type %r is not among the architectures verified against per-block forwards (%s); "
            "its sliding windows, scaling and soft-capping are honoured as its attention layers declare them",
            model_type,
            ", ".join(VERIFIED),
        )


def _what_works(config) -> str:
    """What to use instead of strided mode for a model it refuses."""
    if getattr(config.get_text_config(), "use_bidirectional_attention", False):
        return (
            "ebft trains causal language models, in either mode; use a causal model (README, Supported architectures)"
        )
    how = (
        "its feature and policy passes run the model's own forward, one sequence per padded row, and its rollouts "
        "are sampled with the model's own cache"
    )
    if config.model_type in STRUCTURED_VERIFIED:
        return f"Use ebft.mode: structured, which trains it exactly: {how} (README, Supported architectures)"
    return (
        f"ebft.mode: structured can run it ({how}), but is not verified for {config.model_type!r} "
        "(README, Supported architectures lists the model types it is verified for)"
    )


def log_structured_passes(config) -> None:
    """Log once, at set-up, whether structured mode packs this model's feature and policy passes, or why not."""
    reason = unsupported_reason(config)
    if reason is None:
        log.info("structured mode: feature and policy passes packed (one row per batch, shared prefixes once)")
    else:
        log.info("structured mode: feature and policy passes padded, one sequence per row, not packed: %s", reason)

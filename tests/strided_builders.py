"""Shared builders of the strided step tests: a tiny random model, strided settings, rows, and teacher-forced
log-probs.
"""

from __future__ import annotations

import torch

from ebft.strided.step import StridedSettings

V = 5


def random_model(vocab=V, seed=0):
    """A seeded two-layer Llama over a vocab of V tokens, its LM head scaled for a livelier policy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a livelier policy than the near-uniform random init
        model.lm_head.weight.mul_(8.0)
    return model


def strided_settings(**over) -> StridedSettings:
    """StridedSettings with two-token blocks and plain defaults; keyword arguments replace fields."""
    base = {
        "stride": 2,
        "context_length": 2,
        "generate_max_len": 2,
        "n_samples_per_prompt": 8,
        "temperature": 1.0,
        "top_p": 1.0,
        "min_completion_prefix": 0,
        "embed_method": "last_token",
        "feature_norm": "per_layer",
        "use_whitening": False,
        "whitening_space": "feature",
        "alignment_coef": 1.0,
        "diversity_coef": 1.0,
        "advantage_estimator": "rloo",
        "rl_coef": 1.0,
        "ce_coef": 0.0,
    }
    base.update(over)
    return StridedSettings(**base)


def document_row(tokens):
    """A pre-tokenized training row whose labels are its tokens."""
    return {"input_ids": list(tokens), "labels": list(tokens)}


def teacher_forced_logp(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1..T-1 from a plain forward of the unpadded sequence: [T - 1]."""
    x = torch.tensor([ids])
    logits = model(x).logits[0, :-1] / temperature
    return logits.log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]

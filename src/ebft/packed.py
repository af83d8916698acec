"""Padding-free forwards: many causal sequences packed into one row, attention confined to each sequence.

A micro-batch of sequences of different lengths padded to its longest member spends the padding's share
of every linear layer and attention on nothing. Packed, the N sequences become one row of T = sum of
lengths tokens, positions restarting at 0 for each sequence, and the ``ebft_packed`` attention runs
plain causal SDPA on each sequence's own slice of queries and keys: the same arithmetic as the padded
forward of each sequence, none of its padding.

The backend plugs into transformers through its public ``AttentionInterface``; the plan travels to every
layer as the ``ebft_packed`` keyword of the forward call (as ``ebft.strided.attention`` does).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "ebft_packed"


@dataclass
class PackedPlan:
    """Where each sequence lies in the packed row: ``offsets[i]`` its first position, ``lengths[i]`` its
    token count (both python ints, so slicing needs no device sync)."""

    offsets: list[int]
    lengths: list[int]

    @property
    def total(self) -> int:
        return sum(self.lengths)


@dataclass
class Packed:
    """N sequences as one row: ids [1, T], positions [1, T] (0.. within each sequence), and the plan."""

    ids: torch.Tensor
    positions: torch.Tensor
    plan: PackedPlan


def pack(seqs: list[list[int]]) -> Packed:
    """Concatenate token lists into one row; an empty sequence takes no positions."""
    lengths = [len(q) for q in seqs]
    offsets = [sum(lengths[:i]) for i in range(len(seqs))]
    flat = [t for q in seqs for t in q]
    ids = torch.tensor(flat or [0], dtype=torch.long)[None]
    positions = torch.cat([torch.arange(n) for n in lengths] or [torch.zeros(1, dtype=torch.long)])[None]
    return Packed(ids=ids, positions=positions, plan=PackedPlan(offsets, lengths))


def unpack(values: torch.Tensor, plan: PackedPlan) -> torch.Tensor:
    """Packed per-token values [1, T, ...] -> right-padded [N, W, ...] (W the longest sequence; zeros after
    each sequence's end)."""
    width = max(1, max(plan.lengths, default=1))
    out = values.new_zeros((len(plan.lengths), width, *values.shape[2:]))
    for i, (start, n) in enumerate(zip(plan.offsets, plan.lengths, strict=True)):
        out[i, :n] = values[0, start : start + n]
    return out


def unsupported_reason(config) -> str | None:
    """Why the packed attention cannot reproduce ``config``'s attention (None when it can).

    The backend computes softmax(q k^T * scaling) v with a causal mask over each whole sequence; a model
    whose attention also windows, caps or sinks its scores is run padded instead, by its own backend.
    """
    impl = getattr(config, "_attn_implementation", None)
    if impl not in (None, "sdpa", NAME):
        # The model was loaded with another attention (eager where it has no SDPA path): the packed
        # pass computes SDPA's attention, so such a model runs padded with its own.
        return f"attention implementation {impl!r}"
    text = getattr(config, "get_text_config", lambda: config)()
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return f"sliding-window attention (sliding_window={text.sliding_window})"
    for key in ("attn_logit_softcapping", "attention_chunk_size"):
        if getattr(text, key, None):
            return f"{key}={getattr(text, key)}"
    if getattr(text, "layer_types", None) and any(t != "full_attention" for t in text.layer_types):
        return f"layer types {sorted(set(text.layer_types))}"
    return None


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: query [1, H, T, d], key/value [1, H_kv, T, d] -> [1, T, H, d]."""
    plan: PackedPlan | None = kwargs.get("ebft_packed")
    if plan is None:
        raise RuntimeError("the ebft_packed attention needs the ebft_packed keyword; use packed_forward()")
    if getattr(module, "sinks", None) is not None:
        raise RuntimeError(f"{type(module).__name__} has attention sinks, which the ebft_packed attention omits")
    gqa = query.shape[1] != key.shape[1]
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, a : a + n],
            key[:, :, a : a + n],
            value[:, :, a : a + n],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        for a, n in zip(plan.offsets, plan.lengths, strict=True)
        if n > 0
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """Each sequence's causal mask is implied by the plan; transformers must not build a T x T one."""
    return None


def register() -> str:
    """Make ``ebft_packed`` known to transformers (idempotent); returns the backend name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME


@contextmanager
def packed_backend(model: torch.nn.Module):
    """Run ``model`` with the ``ebft_packed`` attention inside the block, its own backend outside."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(register())
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def packed_forward(body: torch.nn.Module, packed: Packed) -> torch.Tensor:
    """Run a decoder body over one packed row: last hidden state [1, T, H]."""
    device = next(body.parameters()).device
    with packed_backend(body):
        out = body(
            input_ids=packed.ids.to(device),
            position_ids=packed.positions.to(device),
            use_cache=False,
            ebft_packed=packed.plan,
        )
    return out.last_hidden_state

"""Padding-free forwards with shared prefixes: many causal sequences in one row, each prefix computed once.

A micro-batch of sequences of different lengths padded to its longest member spends the padding's share
of every linear layer and attention on nothing, and the n completions of a prompt each recompute the same
prompt. Packed, the N sequences become one row holding each shared prefix once (``ebft.attention.prefix_tree``):
P prompts x n completions cost P x (Lp + n x C) token-forwards instead of P x n x (Lp + C). Each run of
tokens in the row (a tree node) keeps the position ids it has in its sequences, and the ``ebft_packed``
attention lets its queries see the whole of every node before it on its path plus its own keys
causally: the same arithmetic as the model's forward of each sequence alone. Gradients of a shared
prefix are the sum over the sequences that read it, as they would be for separate copies. (With dropout
active, a shared prefix draws one dropout mask for all its sequences where copies would draw one each:
the same expected gradient, correlated across those sequences.)

The backend plugs into transformers through its public ``AttentionInterface``; the plan travels to every
layer as the ``ebft_packed`` keyword of the forward call (as ``ebft.attention.strided`` does).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F

from ebft.attention.backend import attention_backend
from ebft.attention.prefix_tree import prefix_tree, separate

NAME = "ebft_packed"


@dataclass(frozen=True)
class Segment:
    """One tree node in the row: ``offset`` its first packed position, ``length`` its tokens, ``context``
    the (offset, length) of every node before it on its path, root first (keys its queries see in full)."""

    offset: int
    length: int
    context: tuple[tuple[int, int], ...]

    @property
    def context_length(self) -> int:
        return sum(n for _, n in self.context)


@dataclass
class PackedPlan:
    """Where everything lies in the packed row (python ints, so slicing needs no device sync).

    segments: the row's runs of tokens in row order; index[i]: the packed position of each token of
    sequence i, in order (positions of a shared prefix appear in every sequence that has it).
    """

    segments: list[Segment]
    index: list[list[int]]
    _masks: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def total(self) -> int:
        """Tokens in the row: what one forward over it computes."""
        return sum(g.length for g in self.segments)

    @property
    def lengths(self) -> list[int]:
        return [len(ix) for ix in self.index]

    def mask(self, k: int, device: torch.device) -> torch.Tensor:
        """Boolean SDPA mask of segment ``k`` (True = attend): [length, context + length], the context in
        full and the segment's own keys causally. Built once per plan and device (every layer reuses it)."""
        key = (k, str(device))
        if key not in self._masks:
            g = self.segments[k]
            own = torch.ones(g.length, g.length, dtype=torch.bool, device=device).tril()
            seen = torch.ones(g.length, g.context_length, dtype=torch.bool, device=device)
            self._masks[key] = torch.cat([seen, own], dim=1)
        return self._masks[key]


@dataclass
class Packed:
    """N sequences as one row: ids [1, T], positions [1, T] (each token's position in its sequences), plan."""

    ids: torch.Tensor
    positions: torch.Tensor
    plan: PackedPlan


def pack(seqs: list[list[int]], *, share_prefixes: bool = True) -> Packed:
    """Lay token lists out in one row; an empty sequence takes no positions. ``share_prefixes``: every
    common prefix is stored once (False: each sequence whole, one after another)."""
    nodes, paths = (prefix_tree if share_prefixes else separate)(seqs)
    offsets = list(accumulate((n.length for n in nodes), initial=0))[:-1]
    segments = []
    for k, node in enumerate(nodes):
        chain, up = [], node.parent
        while up is not None:
            chain.append((offsets[up], nodes[up].length))
            up = nodes[up].parent
        segments.append(Segment(offsets[k], node.length, tuple(reversed(chain))))
    flat = [t for n in nodes for t in seqs[n.source][n.start : n.start + n.length]]
    pos = [p for n in nodes for p in range(n.start, n.start + n.length)]
    index = [[p for k in path for p in range(offsets[k], offsets[k] + nodes[k].length)] for path in paths]
    ids = torch.tensor(flat or [0], dtype=torch.long)[None]
    positions = torch.tensor(pos or [0], dtype=torch.long)[None]
    return Packed(ids=ids, positions=positions, plan=PackedPlan(segments, index))


def unpack(values: torch.Tensor, plan: PackedPlan) -> torch.Tensor:
    """Packed per-token values [1, T, ...] -> right-padded [N, W, ...] (W the longest sequence; zeros after
    each sequence's end); a shared prefix's values are copied into every sequence that has it."""
    width = max(1, max(plan.lengths, default=1))
    at = torch.zeros(len(plan.index), width, dtype=torch.long)
    valid = torch.zeros(len(plan.index), width, dtype=torch.bool)
    for i, ix in enumerate(plan.index):
        at[i, : len(ix)] = torch.tensor(ix, dtype=torch.long)
        valid[i, : len(ix)] = True
    out = values[0, at.to(values.device)]  # [N, W, ...]
    keep = valid.to(values.device).reshape(*valid.shape, *[1] * (values.dim() - 2))
    return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))


def unsupported_reason(config) -> str | None:
    """Why the packed row cannot reproduce ``config``'s model (None when it can).

    The backend computes softmax(q k^T * scaling) v with a causal mask over each whole sequence. A layer that
    is not attention (recurrent, state-space, convolution, linear attention) carries its state along the row
    from one sequence into the next, and an attention that windows, caps or sinks its scores computes something
    else: such models run padded instead, with their own layers and attention.
    """
    text_config = getattr(config, "get_text_config", None)
    text = text_config(decoder=True) if text_config is not None else config
    layer_types = list(getattr(text, "layer_types", None) or [])
    stateful = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention", "chunked_attention")})
    if stateful:
        return (
            f"layers that are not attention (layer types {stateful}): their recurrent or convolutional state "
            "would run from one packed sequence into the next"
        )
    impl = getattr(config, "_attn_implementation", None)
    if impl not in (None, "sdpa", NAME):
        # The model was loaded with another attention (eager where it has no SDPA path): the packed
        # pass computes SDPA's attention, so such a model runs padded with its own.
        return f"attention implementation {impl!r}"
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return f"sliding-window attention (sliding_window={text.sliding_window})"
    for key in ("attn_logit_softcapping", "attention_chunk_size"):
        if getattr(text, key, None):
            return f"{key}={getattr(text, key)}"
    if any(t != "full_attention" for t in layer_types):
        return f"attention layers that are not all full attention (layer types {sorted(set(layer_types))})"
    return None


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [1, H, T, d], key/value [1, H_kv, T, d] -> [1, T, H, d].

    One SDPA per segment: a root segment is plain causal; a segment after a shared prefix takes the keys of
    its whole path, with a boolean mask (SDPA applies a boolean mask as allow/deny, which is what is meant;
    eager attention would add it to the scores).
    """
    plan: PackedPlan | None = kwargs.get("ebft_packed")
    if plan is None:
        raise RuntimeError("the ebft_packed attention needs the ebft_packed keyword; use packed_forward()")
    if getattr(module, "sinks", None) is not None:
        raise RuntimeError(f"{type(module).__name__} has attention sinks, which the ebft_packed attention omits")
    gqa = query.shape[1] != key.shape[1]
    parts = []
    for k, g in enumerate(plan.segments):
        own = slice(g.offset, g.offset + g.length)
        if g.context:
            cols = [slice(a, a + n) for a, n in g.context] + [own]
            keys = torch.cat([key[:, :, c] for c in cols], dim=2)
            values = torch.cat([value[:, :, c] for c in cols], dim=2)
            mask, causal = plan.mask(k, query.device), False
        else:
            keys, values, mask, causal = key[:, :, own], value[:, :, own], None, True
        parts.append(
            F.scaled_dot_product_attention(
                query[:, :, own],
                keys,
                values,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
    if not parts:  # nothing but the placeholder token of an all-empty batch, which nothing reads
        return torch.zeros_like(query).transpose(1, 2).contiguous(), None
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def packed_backend(model: torch.nn.Module) -> AbstractContextManager:
    """Run ``model`` with the ``ebft_packed`` attention inside the block, its own backend outside."""
    return attention_backend(model, NAME, packed_attention)


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

"""Sparse attention for the packed strided rows (reference spec 11.2, item 3).

The strided mask is 75-85% empty: a generated query sees only the document prefix before its anchor
and the earlier tokens of its own g-token rollout. Dense attention over the S x S mask wastes most of
its work. This module computes the same attention piecewise:

* document queries: plain causal attention over the document;
* generated queries, in chunks of consecutive blocks: attention over the document prefix that the
  chunk's latest anchor needs plus the chunk's own generated tokens, with an exact boolean mask.

On CUDA a flex_attention BlockMask (``layout.flex_block_mask``) does the same job inside one kernel.
The functions plug into transformers through its public ``AttentionInterface`` under the name
``ebft_strided``; the plan travels to every layer as the ``ebft_plan`` keyword of the forward call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ebft.strided.layout import StridedLayout

NAME = "ebft_strided"
# Generated queries per chunk: the chunk re-reads the document prefix once, so larger chunks read it
# fewer times but attend over more of their own (mostly masked) generated keys. ~256 balances the two.
CHUNK_QUERIES = 256


@dataclass
class Chunk:
    """One group of generated queries: packed positions q_index [Q], keys k_index [P + Q], mask [D, 1, Q, P + Q]."""

    q_index: torch.Tensor
    k_index: torch.Tensor
    mask: torch.Tensor


@dataclass
class StridedPlan:
    """Everything the attention function needs for one packed batch; built once per micro-batch."""

    doc_len: int
    chunks: list[Chunk]
    restore: torch.Tensor  # [G]: position in the chunk-ordered output of each generated packed row
    block_mask: object | None = None  # flex_attention BlockMask (CUDA), used instead of the chunks
    compile_flex: bool = True  # False: flex_attention runs eagerly, a reference for the compiled kernel


def build_plan(
    layout: StridedLayout, *, chunk_queries: int = CHUNK_QUERIES, use_flex: bool = False, compile_flex: bool = True
) -> StridedPlan:
    """Split the generated queries into chunks of whole blocks (all their steps and samples).

    ``use_flex``: one flex_attention BlockMask instead (CUDA), compiled on CUDA unless ``compile_flex`` is False.
    """
    if use_flex:
        from ebft.strided.layout import flex_block_mask

        mask = flex_block_mask(layout)
        return StridedPlan(layout.doc_len, [], torch.empty(0), block_mask=mask, compile_flex=compile_flex)
    dev = layout.anchors.device
    L, n, K, g = layout.doc_len, layout.n, layout.k, layout.g
    gen_index = layout.gen_index()  # [n, K, g] packed positions
    blocks_per_chunk = max(1, chunk_queries // (n * g))
    chunks, order = [], []
    for k0 in range(0, K, blocks_per_chunk):
        k1 = min(K, k0 + blocks_per_chunk)
        q_index = gen_index[:, k0:k1].reshape(-1)  # [Q] ordered (i, k, t)
        anchors = layout.anchors[:, k0:k1]  # [D, m]
        prefix = int(anchors.max())
        m = k1 - k0
        # Metadata of each query in (i, k, t) order.
        q_block = torch.arange(m, device=dev).repeat_interleave(g).repeat(n)  # [Q]
        q_rollout = torch.arange(n * m, device=dev).repeat_interleave(g)
        q_step = torch.arange(g, device=dev).repeat(n * m)
        q_anchor = anchors[:, q_block]  # [D, Q]
        to_doc = torch.arange(prefix, device=dev)[None, None, :] < q_anchor[:, :, None]  # [D, Q, P]
        to_gen = (q_rollout[:, None] == q_rollout[None, :]) & (q_step[None, :] <= q_step[:, None])  # [Q, Q]
        mask = torch.cat([to_doc, to_gen[None].expand(layout.num_docs, -1, -1)], dim=-1)[:, None]
        k_index = torch.cat([torch.arange(prefix, device=dev), q_index])
        chunks.append(Chunk(q_index=q_index, k_index=k_index, mask=mask))
        order.append(q_index)
    restore = torch.empty(layout.total_len - L, dtype=torch.long, device=dev)
    restore[torch.cat(order) - L] = torch.arange(restore.numel(), device=dev)
    return StridedPlan(doc_len=L, chunks=chunks, restore=restore)


def _sdpa(q, k, v, mask, scaling, dropout, is_causal=False):
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )


_compiled_flex = None


def _flex(q, k, v, block_mask, scaling, compiled: bool):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if compiled and q.is_cuda:
        # flex_attention is only fast (and memory-lean) when compiled; compile once per process.
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])


def strided_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: query [D, H, S, d], key/value [D, H_kv, S, d] -> [D, S, H, d]."""
    plan: StridedPlan | None = kwargs.get("ebft_plan")
    if plan is None:
        raise RuntimeError("the ebft_strided attention needs the ebft_plan keyword; use strided_forward()")
    if plan.block_mask is not None:
        out = _flex(query, key, value, plan.block_mask, scaling, plan.compile_flex)
        return out.transpose(1, 2).contiguous(), None
    L = plan.doc_len
    # Document queries see only document keys, causally; right padding never precedes a real token.
    doc = _sdpa(query[:, :, :L], key[:, :, :L], value[:, :, :L], None, scaling, dropout, is_causal=True)
    parts = [
        _sdpa(query[:, :, c.q_index], key[:, :, c.k_index], value[:, :, c.k_index], c.mask, scaling, dropout)
        for c in plan.chunks
    ]
    gen = torch.cat(parts, dim=2)[:, :, plan.restore]
    return torch.cat([doc, gen], dim=2).transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """The plan carries the masks, so transformers must not build an S x S one for this backend."""
    return None


def register() -> str:
    """Make ``ebft_strided`` known to transformers (idempotent); returns the backend name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, strided_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME


@contextmanager
def strided_backend(model: torch.nn.Module):
    """Run ``model`` with the ``ebft_strided`` attention inside the block, its own backend outside."""
    config = model.config
    previous = config._attn_implementation
    model.set_attn_implementation(register())
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def strided_forward(body: torch.nn.Module, packed: torch.Tensor, positions: torch.Tensor, plan: StridedPlan):
    """Run a decoder body over packed rows with the plan's attention: [D, S] -> last hidden state [D, S, H]."""
    return body(input_ids=packed, position_ids=positions, use_cache=False, ebft_plan=plan).last_hidden_state

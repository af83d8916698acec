"""Sparse attention for the packed strided rows (docs/design.md §4.8, §7.1).

The strided mask is 75-85% empty: a generated query sees only the document prefix before its anchor
and the earlier tokens of its own g-token rollout. Dense attention over the S x S mask wastes most of
its work. This module computes the same attention piecewise:

* document queries: plain causal attention over the document;
* generated queries, in chunks of consecutive blocks: attention over the document prefix that the
  chunk's latest anchor needs plus the chunk's own generated tokens, with an exact boolean mask.

On CUDA a flex_attention BlockMask (``layout.flex_block_mask``) does the same job inside one kernel.
Every pass over packed rows runs here, the KV-cached generation included, so each layer's own
attention (its sliding window, scaling, soft-capping, GQA) is applied in one place and the packed row
computes what the layer computes on each block alone.

The functions plug into transformers through its public ``AttentionInterface`` under the name
``ebft_strided``; the plan travels to every layer as the ``ebft_plan`` keyword of the forward call.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from ebft.attention.backend import attention_backend
from ebft.attention.kernels import attend, causal_window_mask, softcap, window_mask
from ebft.attention.strided_layout import StridedLayout, flex_block_mask

NAME = "ebft_strided"
# Generated queries per chunk: the chunk re-reads the document prefix once, so larger chunks read it
# fewer times but attend over more of their own (mostly masked) generated keys. ~256 balances the two.
CHUNK_QUERIES = 256
# Queries per chunk of a decoding step: a step has one query per rollout, and a chunk's keys are the document
# prefix plus every cached token of its own rollouts, so smaller chunks read fewer keys that their queries
# cannot see; 64 keeps the number of attention calls per step small (8 at the paper's settings).
DECODE_CHUNK_QUERIES = 64
# Attention-function keywords of transformers models that change the result and are not implemented
# here; ``ebft.attention.support`` refuses such models at load time, this is the last line of defence.
UNSUPPORTED_KWARGS = {"s_aux": "attention sinks (GPT-OSS `sinks`)"}


@dataclass
class MaskedQueries:
    """Queries attending over an explicit key set: base mask [D, 1, Q, K] and the position ids of both
    sides ([D, Q], [D, K]) from which each sliding window is derived (and kept per window)."""

    mask: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    windowed: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask_for(self, window: int | None) -> torch.Tensor:
        if window is None:
            return self.mask
        if window not in self.windowed:
            self.windowed[window] = self.mask & window_mask(self.q_pos, self.k_pos, window)
        return self.windowed[window]


@dataclass
class Chunk:
    """One group of generated queries: packed positions q_index [Q], keys k_index [P + Q], and its mask."""

    q_index: torch.Tensor
    k_index: torch.Tensor
    masked: MaskedQueries


@dataclass
class DocumentPlan:
    """Causal attention over the first ``doc_len`` rows (documents keep positions 0..L-1)."""

    doc_len: int
    masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def attend(self, query, key, value, *, scaling, window, softcap_value, dropout):
        L = self.doc_len
        q, k, v = query[:, :, :L], key[:, :, :L], value[:, :, :L]
        if window is None:
            # Right padding never precedes a real token, so plain causal attention is exact.
            return attend(q, k, v, None, scaling=scaling, softcap_value=softcap_value, dropout=dropout, is_causal=True)
        if window not in self.masks:
            self.masks[window] = causal_window_mask(L, window, query.device)
        return attend(q, k, v, self.masks[window], scaling=scaling, softcap_value=softcap_value, dropout=dropout)


@dataclass
class DecodePlan:
    """One KV-cached decoding step of the strided rollouts (generation): the step's n*K queries in chunks of
    whole blocks, each chunk attending over the cached keys its queries may see (``decode_plan``)."""

    chunks: list[Chunk]
    restore: torch.Tensor  # [n*K]: position in the chunk-ordered output of each query of the step

    def attend(self, query, key, value, *, scaling, window, softcap_value, dropout):
        kw = {"scaling": scaling, "softcap_value": softcap_value, "dropout": dropout}
        parts = [
            attend(
                query[:, :, c.q_index], key[:, :, c.k_index], value[:, :, c.k_index], c.masked.mask_for(window), **kw
            )
            for c in self.chunks
        ]
        return torch.cat(parts, dim=2)[:, :, self.restore]


@dataclass
class GatheredChunks:
    """Every chunk's queries and keys taken by one index each, then split into per-chunk views.

    Indexing a tensor that needs a gradient costs, in backward, a zero tensor of the whole packed row and a
    scatter into it; one index per chunk paid that per chunk and summed the results (48 full-size zero tensors
    per layer at the paper's settings). One gather for all chunks pays it once; the split's backward is a cat.
    """

    q_index: torch.Tensor  # [sum Q]: every chunk's query rows, chunk after chunk
    k_index: torch.Tensor  # [sum P + Q]: every chunk's key rows, chunk after chunk
    q_sizes: list[int]
    k_sizes: list[int]

    @classmethod
    def of(cls, chunks: list[Chunk]) -> GatheredChunks:
        if not chunks:
            empty = torch.empty(0, dtype=torch.long)
            return cls(empty, empty, [], [])
        return cls(
            torch.cat([c.q_index for c in chunks]),
            torch.cat([c.k_index for c in chunks]),
            [c.q_index.numel() for c in chunks],
            [c.k_index.numel() for c in chunks],
        )

    def split(self, query, key, value):
        """query [D, H, S, d], key/value [D, H_kv, S, d] -> per chunk: its queries, keys and values."""
        return (
            query[:, :, self.q_index].split(self.q_sizes, dim=2),
            key[:, :, self.k_index].split(self.k_sizes, dim=2),
            value[:, :, self.k_index].split(self.k_sizes, dim=2),
        )


@dataclass
class StridedPlan:
    """Everything the attention function needs for one packed batch; built once per micro-batch.

    CPU: the document part and the chunks. CUDA (``flex_layout`` set): one flex_attention BlockMask per
    sliding window, built on first use.
    """

    doc_len: int
    chunks: list[Chunk]
    restore: torch.Tensor  # [G]: position in the chunk-ordered output of each generated packed row
    flex_layout: StridedLayout | None = None
    layout: StridedLayout | None = None  # the chunked plan's layout, to rebuild it for another device
    block_masks: dict = field(default_factory=dict)
    compile_flex: bool = True  # False: flex_attention runs eagerly, a reference for the compiled kernel
    document: DocumentPlan = field(init=False)
    gathered: GatheredChunks = field(init=False)

    def __post_init__(self):
        self.document = DocumentPlan(self.doc_len)
        self.gathered = GatheredChunks.of(self.chunks)

    @property
    def uses_flex(self) -> bool:
        return self.flex_layout is not None

    def block_mask(self, window: int | None):
        if window not in self.block_masks:
            if self.flex_layout is None:
                raise RuntimeError("a StridedPlan without flex_layout has no flex_attention block masks")
            self.block_masks[window] = flex_block_mask(self.flex_layout, window)
        return self.block_masks[window]

    def attend(self, query, key, value, *, scaling, window, softcap_value, dropout):
        if self.uses_flex:
            if dropout > 0:
                raise ValueError(
                    f"the model asks for attention dropout {dropout}, which flex_attention does not implement; "
                    "set the model config's attention_dropout to 0"
                )
            return _flex(query, key, value, self.block_mask(window), scaling, softcap_value, self.compile_flex)
        kw = {"scaling": scaling, "softcap_value": softcap_value, "dropout": dropout}
        doc = self.document.attend(query, key, value, window=window, **kw)
        queries, keys, values = self.gathered.split(query, key, value)
        parts = [
            attend(q, k, v, c.masked.mask_for(window), **kw)
            for q, k, v, c in zip(queries, keys, values, self.chunks, strict=True)
        ]
        gen = torch.cat(parts, dim=2)[:, :, self.restore]
        return torch.cat([doc, gen], dim=2)


def build_plan(
    layout: StridedLayout, *, chunk_queries: int = CHUNK_QUERIES, use_flex: bool = False, compile_flex: bool = True
) -> StridedPlan:
    """Split the generated queries into chunks of whole blocks (all their steps and samples).

    ``use_flex``: flex_attention BlockMasks instead (CUDA), compiled on CUDA unless ``compile_flex`` is False.
    """
    if use_flex:
        return StridedPlan(layout.doc_len, [], torch.empty(0), flex_layout=layout, compile_flex=compile_flex)
    dev = layout.anchors.device
    L, n, K, g = layout.doc_len, layout.n, layout.k, layout.g
    positions = layout.position_ids()  # [D, S]
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
        masked = MaskedQueries(mask, positions[:, q_index], positions[:, k_index])
        chunks.append(Chunk(q_index=q_index, k_index=k_index, masked=masked))
        order.append(q_index)
    restore = torch.empty(layout.total_len - L, dtype=torch.long, device=dev)
    restore[torch.cat(order) - L] = torch.arange(restore.numel(), device=dev)
    return StridedPlan(doc_len=L, chunks=chunks, restore=restore, layout=layout)


def decode_plan(
    layout: StridedLayout, t: int, positions: torch.Tensor, *, chunk_queries: int = DECODE_CHUNK_QUERIES
) -> DecodePlan:
    """Attention of decoding step ``t``: the queries are the step's tokens (packed rows ``layout.step_rows(t)``,
    (i, k) order), the keys the cache of packed rows [0, step_rows(t).stop).

    Query (t, i, k) sees the document keys before c_k and the tokens (t', i, k), t' <= t, of its own rollout:
    every other cached key is masked out. A chunk of whole blocks attends over the document prefix its latest
    anchor needs plus its own rollouts' cached tokens, not over the whole cache (at the paper's settings the
    whole cache is 2-8x the keys a step's queries may see). ``positions``: [D, S] of the packed rows.
    """
    dev = layout.anchors.device
    L, n, K = layout.doc_len, layout.n, layout.k
    per_step = layout.per_step
    blocks_per_chunk = max(1, chunk_queries // n)
    chunks, order = [], []
    for k0 in range(0, K, blocks_per_chunk):
        k1 = min(K, k0 + blocks_per_chunk)
        m = k1 - k0
        local = (torch.arange(n, device=dev)[:, None] * K + torch.arange(k0, k1, device=dev)[None, :]).reshape(-1)
        anchors = layout.anchors[:, k0:k1]  # [D, m]
        prefix = int(anchors.max())
        # Cached tokens of the chunk's rollouts, step-major: key s * Q + j is rollout j's token of step s.
        gen_keys = (L + torch.arange(t + 1, device=dev)[:, None] * per_step + local[None, :]).reshape(-1)
        k_index = torch.cat([torch.arange(prefix, device=dev), gen_keys])
        q_anchor = anchors[:, torch.arange(m, device=dev).repeat(n)]  # [D, Q]
        to_doc = torch.arange(prefix, device=dev)[None, None, :] < q_anchor[:, :, None]  # [D, Q, P]
        Q = local.numel()
        to_gen = torch.arange(Q, device=dev)[:, None] == torch.arange(Q, device=dev).repeat(t + 1)[None, :]
        mask = torch.cat([to_doc, to_gen[None].expand(layout.num_docs, -1, -1)], dim=-1)[:, None]
        masked = MaskedQueries(mask, positions[:, L + t * per_step + local], positions[:, k_index])
        chunks.append(Chunk(q_index=local, k_index=k_index, masked=masked))
        order.append(local)
    restore = torch.empty(per_step, dtype=torch.long, device=dev)
    restore[torch.cat(order)] = torch.arange(per_step, device=dev)
    return DecodePlan(chunks, restore)


_compiled_flex: Callable[..., torch.Tensor] | None = None
_score_mods: dict[float, object] = {}


def _softcap_score_mod(cap: float):
    """flex_attention score_mod for soft-capping; one function object per cap so compiled kernels are reused."""
    if cap not in _score_mods:

        def score_mod(score, b, h, q_idx, kv_idx):
            return softcap(score, cap)

        _score_mods[cap] = score_mod
    return _score_mods[cap]


def _flex(q, k, v, block_mask, scaling, softcap_value, compiled: bool):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    fn: Callable[..., torch.Tensor] = flex_attention
    if compiled and q.is_cuda:
        # flex_attention is only fast (and memory-lean) when compiled; compile once per process.
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        fn = _compiled_flex
    score_mod = _softcap_score_mod(softcap_value) if softcap_value is not None else None
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])


def strided_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, softcap=None, **kwargs
):
    """transformers attention function: query [D, H, Q, d], key/value [D, H_kv, K, d] -> [D, Q, H, d].

    ``scaling``, ``sliding_window`` and ``softcap`` are the calling layer's own (None where the layer
    has none); the plan supplies the strided structure.
    """
    plan = kwargs.get("ebft_plan")
    if plan is None:
        raise RuntimeError("the ebft_strided attention needs the ebft_plan keyword; use strided_forward()")
    for name, what in UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{type(module).__name__} uses {what}, which strided mode cannot compute")
    out = plan.attend(query, key, value, scaling=scaling, window=sliding_window, softcap_value=softcap, dropout=dropout)
    return out.transpose(1, 2).contiguous(), None


def strided_backend(model: torch.nn.Module) -> AbstractContextManager:
    """Run ``model`` with the ``ebft_strided`` attention inside the block, its own backend outside."""
    return attention_backend(model, NAME, strided_attention)


def strided_forward(body: torch.nn.Module, packed: torch.Tensor, positions: torch.Tensor, plan: StridedPlan):
    """Run a decoder body over packed rows with the plan's attention: [D, S] -> last hidden state [D, S, H]."""
    return body(input_ids=packed, position_ids=positions, use_cache=False, ebft_plan=plan).last_hidden_state

"""The packed strided layout: one row per document, shared by its n samples (docs/design.md §4.3).

Row d holds ``[document (L tokens, right padded) | generated region]``. The generated region is
step-major: all tokens of step 0, then step 1, ... For step t it holds the n*K tokens of every
(sample i, block k) pair, sample-major, so generated token (t, i, k) sits at

    L + t * (n * K) + i * K + k.

This ordering makes KV-cached decoding append one contiguous slab of n*K tokens per step.

Attention rule (paper Section F; docs/design.md §4.3):
* document query p sees document keys j <= p (plain causal);
* generated query (t, i, k) sees document keys j < c_k (the whole nested prefix, not a window)
  and the tokens (t', i, k) of its own rollout with t' <= t; nothing else.
Position ids: document token j -> j; generated token (t, i, k) -> c_k + t, the position of the
ground-truth token it stands in for.
A sliding-window layer (window W) further drops every key whose position is W or more below the
query's position, as the same layer does when the block runs on its own (``kernels.window_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebft.attention.kernels import window_mask
from ebft.strided.anchors import block_anchors


@dataclass(frozen=True)
class StridedLayout:
    """Index bookkeeping for a batch of D documents with K block slots, n samples, g tokens each.

    anchors: [D, K] long, first position of each block's ground-truth window.
    valid:   [D, K] bool, False for slots beyond a document's last block (generated, never used).
    """

    doc_len: int
    anchors: torch.Tensor
    valid: torch.Tensor
    n: int
    g: int

    @property
    def num_docs(self) -> int:
        return self.anchors.shape[0]

    @property
    def k(self) -> int:
        return self.anchors.shape[1]

    @property
    def per_step(self) -> int:
        """Generated tokens per decoding step: n * K."""
        return self.n * self.k

    @property
    def total_len(self) -> int:
        """S = L + g * n * K."""
        return self.doc_len + self.g * self.per_step

    def select(self, d: int) -> StridedLayout:
        """The layout of document d alone (same doc_len and slot count)."""
        return StridedLayout(self.doc_len, self.anchors[d : d + 1], self.valid[d : d + 1], self.n, self.g)

    def gen_index(self) -> torch.Tensor:
        """[n, K, g] packed position of generated token (t, i, k), indexed as [i, k, t]."""
        dev = self.anchors.device
        t = torch.arange(self.g, device=dev)[None, None, :]
        i = torch.arange(self.n, device=dev)[:, None, None]
        k = torch.arange(self.k, device=dev)[None, :, None]
        return self.doc_len + t * self.per_step + i * self.k + k

    def gt_index(self) -> torch.Tensor:
        """[D, K, g] document position of the ground-truth token aligned with step t of block k."""
        return self.anchors[:, :, None] + torch.arange(self.g, device=self.anchors.device)

    def position_ids(self) -> torch.Tensor:
        """[D, S] position ids of the packed rows."""
        doc = torch.arange(self.doc_len, device=self.anchors.device).expand(self.num_docs, -1)
        # generated (t, i, k) -> c_k + t, laid out as [D, g, n, K] then flattened step-major.
        gen = self.anchors[:, None, None, :] + torch.arange(self.g, device=self.anchors.device)[None, :, None, None]
        gen = gen.expand(-1, -1, self.n, -1).reshape(self.num_docs, -1)
        return torch.cat([doc, gen], dim=1)

    def attention_mask(self, window: int | None = None) -> torch.Tensor:
        """[D, 1, S, S] bool, True where the query may attend to the key (in a layer with this ``window``)."""
        D, L, S, dev = self.num_docs, self.doc_len, self.total_len, self.anchors.device
        mask = torch.zeros(D, 1, S, S, dtype=torch.bool, device=dev)
        mask[:, 0, :L, :L] = torch.tril(torch.ones(L, L, dtype=torch.bool, device=dev))
        # Generated query metadata in packed order [g, n, K] -> flat G = g * n * K.
        q_step = torch.arange(self.g, device=dev).repeat_interleave(self.per_step)
        q_rollout = torch.arange(self.per_step, device=dev).repeat(self.g)
        q_anchor = self.anchors.repeat(1, self.n * self.g)  # [D, G]: anchor of slot (i, k) at every step
        mask[:, 0, L:, :L] = torch.arange(L, device=dev)[None, None, :] < q_anchor[:, :, None]
        same_rollout = q_rollout[:, None] == q_rollout[None, :]
        not_later = q_step[None, :] <= q_step[:, None]
        mask[:, 0, L:, L:] = (same_rollout & not_later)[None]
        if window is not None:
            pos = self.position_ids()
            mask &= window_mask(pos, pos, window)
        return mask

    def step_rows(self, t: int) -> slice:
        """Packed rows holding the tokens of decoding step t."""
        start = self.doc_len + t * self.per_step
        return slice(start, start + self.per_step)

    def predictor_index(self) -> torch.Tensor:
        """[D, n, K, g] packed row whose logits predict generated token (t, i, k).

        Step 0 is predicted by the document token just before the anchor (c_k - 1); step t > 0 by the
        same rollout's previous token, n*K rows earlier. A plain shift by one is wrong here: the
        previous packed row belongs to another rollout.
        """
        gen = self.gen_index()[None].expand(self.num_docs, -1, -1, -1)
        first = (self.anchors - 1)[:, None, :, None].expand(-1, self.n, -1, 1)
        return torch.cat([first, gen[..., :-1]], dim=-1)


def build_layout(
    lengths: torch.Tensor,
    prompt_length: torch.Tensor,
    doc_len: int,
    *,
    stride: int,
    context_length: int,
    gen_len: int,
    min_completion_prefix: int,
    n: int,
) -> StridedLayout:
    """Layout for a batch: per-document anchors (docs/design.md §4.1), padding never anchored.

    lengths: [D] real tokens per document; prompt_length: [D], -1 where the row has no prompt.
    """

    has_prompt = prompt_length >= 0
    first = torch.where(
        has_prompt,
        torch.clamp(prompt_length + min_completion_prefix, min=context_length),
        torch.full_like(prompt_length, context_length),
    )
    anchors, valid = block_anchors(lengths, first, stride, gen_len)
    return StridedLayout(doc_len=doc_len, anchors=anchors, valid=valid, n=n, g=gen_len)


def flex_mask_mod(layout: StridedLayout, window: int | None = None):
    """The same rule as :meth:`StridedLayout.attention_mask`, as a flex_attention ``mask_mod``.

    Used on CUDA, where a BlockMask skips the ~75-85% of (query, key) tiles that are empty instead of
    materialising an S x S mask. Index arithmetic only, so it can be traced by flex_attention.
    """
    L, per_step, k_slots = layout.doc_len, layout.per_step, layout.k
    anchors = layout.anchors
    positions = layout.position_ids()

    def mask_mod(b, h, q_idx, kv_idx):
        q_gen = q_idx >= L
        kv_gen = kv_idx >= L
        q_off = torch.clamp(q_idx - L, min=0)
        kv_off = torch.clamp(kv_idx - L, min=0)
        q_anchor = anchors[b, q_off % k_slots]
        doc_query = ~q_gen & ~kv_gen & (kv_idx <= q_idx)
        gen_to_doc = q_gen & ~kv_gen & (kv_idx < q_anchor)
        gen_to_gen = (
            q_gen & kv_gen & (q_off % per_step == kv_off % per_step) & (kv_off // per_step <= q_off // per_step)
        )
        allowed = doc_query | gen_to_doc | gen_to_gen
        if window is None:
            return allowed
        return allowed & (positions[b, q_idx] - positions[b, kv_idx] < window)

    return mask_mod


def flex_block_mask(layout: StridedLayout, window: int | None = None):
    """BlockMask for flex_attention over the packed rows (CUDA training and feature passes), for layers
    with this sliding ``window`` (None: global attention)."""
    from torch.nn.attention.flex_attention import create_block_mask

    S = layout.total_len
    return create_block_mask(
        flex_mask_mod(layout, window), B=layout.num_docs, H=None, Q_LEN=S, KV_LEN=S, device=layout.anchors.device
    )

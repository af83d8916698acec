"""Where the strided blocks of a document start (paper Section F; docs/design.md §4.1).

Block k of a document starts at c_k = a + k * stride, with the first anchor
a = max(context_length, prompt_length + min_completion_prefix). A block exists only if its
ground-truth window [c_k, c_k + g) lies inside the document's real (non-padding) tokens, so
padding is never anchored and never rewarded.
"""

from __future__ import annotations

import torch


def first_anchor(context_length: int, prompt_length: int | None, min_completion_prefix: int) -> int:
    """First anchor of one document. Raw text (no prompt) starts at ``context_length``."""
    if prompt_length is None:
        return context_length
    return max(context_length, prompt_length + min_completion_prefix)


def num_blocks(length: int, anchor: int, stride: int, gen_len: int) -> int:
    """Number of blocks whose window [anchor + k*stride, ... + gen_len) fits in ``length`` real tokens."""
    if anchor + gen_len > length:
        return 0
    return (length - gen_len - anchor) // stride + 1


def block_anchors(
    lengths: torch.Tensor,
    first: torch.Tensor,
    stride: int,
    gen_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors of a batch of documents.

    lengths: [D] real tokens per document; first: [D] first anchor per document.
    Returns (anchors [D, K] long, valid [D, K] bool) with K the largest block count in the batch
    (at least 1). Invalid slots repeat the document's first anchor, clamped so that every slot
    still points inside the document; they are generated but never used.
    """
    counts = torch.clamp((lengths - gen_len - first) // stride + 1, min=0)
    counts = torch.where(first + gen_len > lengths, torch.zeros_like(counts), counts)
    k_max = max(int(counts.max().item()) if counts.numel() else 0, 1)
    k = torch.arange(k_max, device=lengths.device)
    anchors = first[:, None] + k[None, :] * stride
    valid = k[None, :] < counts[:, None]
    safe = torch.clamp(first, max=torch.clamp(lengths - 1, min=1))
    anchors = torch.where(valid, anchors, safe[:, None].expand_as(anchors))
    return anchors, valid

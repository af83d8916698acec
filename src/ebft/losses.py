"""Token log-probabilities without a [tokens, vocab] fp32 tensor kept for backward."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ebft.sampling import nucleus_keep


def _chunk_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float, top_p: float
) -> torch.Tensor:
    logits = head(hidden).float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    if top_p < 1.0:
        # The sampler drew from the renormalised nucleus, so the policy whose gradient we take is that
        # distribution. Set membership is a constant of the sample (no gradient through the cut); the
        # drawn token is always a member, which we enforce against tiny numeric differences.
        keep = nucleus_keep(logits.detach(), top_p)
        keep.scatter_(-1, targets[:, None], True)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits.log_softmax(dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def token_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """log p(target | hidden) for N rows: hidden [N, H], targets [N] -> [N] fp32.

    The LM head runs chunk by chunk; with autograd on, each chunk is recomputed in backward instead of
    saving its [chunk, V] fp32 log-softmax, so peak memory is one chunk of logits, not N of them.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if need_grad:
            out.append(checkpoint(_chunk_logprobs, h, t, head, temperature, top_p, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(h, t, head, temperature, top_p))
    return torch.cat(out)

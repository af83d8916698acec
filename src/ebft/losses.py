"""Token log-probabilities and policy losses (pure torch).

``token_logprobs`` scores tokens without keeping a [tokens, vocab] fp32 tensor for backward.
``clipped_surrogate`` and ``aggregate`` are the structured-mode policy loss (PPO/GRPO-style).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import torch
from torch.utils.checkpoint import checkpoint

from ebft.choices import LOSS_TYPES
from ebft.sampling import truncation_keep

# Elements of one [chunk, V] fp32 logits tensor in ``token_logprobs`` (64 MiB).
CHUNK_ELEMENTS = 1 << 24


def _chunk_logprobs_parts(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
) -> torch.Tensor:
    """[chunk, V] fp32 logits of the sampler's distribution: tempered, truncated (-inf outside the set)."""
    logits = head(hidden).float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    if top_p < 1.0 or top_k > 0 or min_p > 0.0:
        # The sampler drew from the renormalised truncated distribution, so the policy whose gradient we
        # take is that distribution. Set membership is a constant of the sample (no gradient through the
        # cut); the drawn token is always a member, which we enforce against tiny numeric differences.
        keep = truncation_keep(logits.detach(), top_p, top_k, min_p)
        keep.scatter_(-1, targets[:, None], True)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


@torch.no_grad()
def _entropy(logp_all: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """[chunk, V] log-probs and probs -> [chunk] entropy (no gradient); 0 log 0 counts as 0."""
    return -(probs * logp_all.masked_fill(probs == 0, 0.0)).sum(-1)


def _chunk_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = _chunk_logprobs_parts(hidden, targets, head, temperature, top_p, top_k, min_p)
    logp_all = logits.log_softmax(dim=-1)
    # The entropy costs two more [chunk, V] tensors; only the structured metrics ask for it.
    entropy = _entropy(logp_all, logp_all.detach().exp()) if with_entropy else None
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), entropy


def _frozen_head_chunk(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Linear,
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``_chunk_logprobs`` for a frozen linear head (LoRA), with its gradient taken in the same pass.

    With logits z = W h / T (+ bias), d log p(t) / d h = (W[t] - sum_v p_v W[v]) / T, p the (truncated)
    distribution; the gradient through the truncation mask is zero, as in ``_chunk_logprobs``. Computing
    it here costs one [chunk, V] x [V, H] product and nothing is recomputed in backward, where the
    checkpointed path runs the head and the softmax a second time and then back-propagates
    the head. The result is attached as value + <h - h.detach(), J>: exactly the value, gradient J.
    """
    with torch.no_grad():
        logits = _chunk_logprobs_parts(hidden, targets, head, temperature, top_p, top_k, min_p)
        logp_all = logits.log_softmax(dim=-1)
        probs = logp_all.exp()
        entropy = _entropy(logp_all, probs) if with_entropy else None
        weight = head.weight.float()
        scale = 1.0 if temperature in (0.0, 1.0) else 1.0 / temperature
        jac = (weight[targets] - probs @ weight) * scale  # [chunk, H]
        value = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    h = hidden.float()
    return value + ((h - h.detach()) * jac).sum(-1), entropy


@overload
def token_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    *,
    temperature: float = ...,
    top_p: float = ...,
    top_k: int = ...,
    min_p: float = ...,
    chunk_size: int | None = ...,
    with_entropy: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def token_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    *,
    temperature: float = ...,
    top_p: float = ...,
    top_k: int = ...,
    min_p: float = ...,
    chunk_size: int | None = ...,
    with_entropy: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def token_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    *,
    temperature: float = ...,
    top_p: float = ...,
    top_k: int = ...,
    min_p: float = ...,
    chunk_size: int | None = ...,
    with_entropy: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def token_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(target | hidden) for N rows: hidden [N, H], targets [N] -> [N] fp32.

    The distribution is the sampler's: logits / temperature, truncated by top_k, top_p and min_p and
    renormalised. With ``with_entropy`` also returns the entropy of that distribution per row ([N],
    no gradient). The LM head runs chunk by chunk; with autograd on, each chunk is recomputed in
    backward instead of saving its [chunk, V] fp32 log-softmax, so peak memory is one chunk of logits.
    ``chunk_size`` rows per chunk; default: as many as keep one [chunk, V] fp32 tensor near 64 MiB (1024
    rows of a 16k vocabulary, 341 of SmolLM2's 49k), since a chunk's softmax holds a few such tensors.
    """
    if chunk_size is None:
        weight = getattr(head, "weight", None)
        chunk_size = max(1, CHUNK_ELEMENTS // weight.shape[0]) if weight is not None else 1024
    if hidden.shape[0] == 0:
        # Through the head even with no rows: its parameters then get a (zero) gradient on every process,
        # so under FSDP every process reduce-scatters the same gradients.
        empty = head(hidden).float().sum(-1)
        return (empty, hidden.new_zeros(0, dtype=torch.float32)) if with_entropy else empty
    head_grad = any(p.requires_grad for p in head.parameters())
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_grad)
    # A sharded (DTensor) weight is only whole inside the head's own forward: those heads take the general path.
    frozen_linear = (
        head if isinstance(head, torch.nn.Linear) and not head_grad and type(head.weight.data) is torch.Tensor else None
    )
    logps: list[torch.Tensor] = []
    entropies: list[torch.Tensor] = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        sampler = (temperature, top_p, top_k, min_p, with_entropy)
        if need_grad and frozen_linear is not None:
            logp, entropy = _frozen_head_chunk(h, t, frozen_linear, *sampler)
        elif need_grad:
            logp, entropy = checkpoint(_chunk_logprobs, h, t, head, *sampler, use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(h, t, head, *sampler)
        logps.append(logp)
        if entropy is not None:
            entropies.append(entropy)
    logp = torch.cat(logps)
    return (logp, torch.cat(entropies)) if with_entropy else logp


@dataclass(frozen=True)
class Surrogate:
    """Per-token results of the clipped surrogate, all [T].

    loss: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) * w, with r = exp(logp - old_logp).
    ratio: r (detached). low_clipped / high_clipped: the clip bound is active and binding (r below
    1 - eps_low with A < 0, or above 1 + eps_high with A > 0), so the token gives no gradient.
    """

    loss: torch.Tensor
    ratio: torch.Tensor
    low_clipped: torch.Tensor
    high_clipped: torch.Tensor


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantage: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    weight: torch.Tensor | None = None,
) -> Surrogate:
    """The PPO/GRPO token loss (all inputs [T]; ``weight`` is an optional importance-sampling factor).

    On-policy (old_logp == logp.detach()) the ratio is 1, nothing is clipped and the gradient is
    -A * grad logp: REINFORCE with advantage A.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantage
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantage
    loss = -torch.minimum(unclipped, clipped)
    if weight is not None:
        loss = loss * weight
    r = ratio.detach()
    return Surrogate(
        loss=loss,
        ratio=r,
        low_clipped=(r < 1.0 - eps_low) & (advantage < 0),
        high_clipped=(r > 1.0 + eps_high) & (advantage > 0),
    )


@dataclass(frozen=True)
class LossNorm:
    """The denominators of one optimizer step (all micro-batches, all processes).

    sequences: completions in the step; tokens: their loss tokens; max_completion_length: the cap
    used by dr_grpo; micro_batches: micro-batches x processes (bnpo averages per-micro-batch means).
    """

    sequences: int
    tokens: int
    max_completion_length: int
    micro_batches: int


def aggregate(
    token_loss: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, loss_type: str, norm: LossNorm
) -> torch.Tensor:
    """This micro-batch's share of the step's policy loss.

    token_loss [T] and seq_index [T] (which of the micro-batch's ``num_seqs`` completions each token
    belongs to). Summing the returned values over all micro-batches and processes gives:

    * ``grpo``: the mean over completions of each completion's mean token loss;
    * ``dapo``: the mean over all loss tokens of the step;
    * ``dr_grpo``: the token sum divided by (completions x max_completion_length), so the weight of a
      token does not depend on its completion's length;
    * ``bnpo``: the mean over micro-batches of each micro-batch's token mean (TRL's definition; it
      depends on how the step is split).
    """
    if loss_type == "grpo":
        per_seq = token_loss.new_zeros(num_seqs).index_add(0, seq_index, token_loss)
        counts = torch.bincount(seq_index, minlength=num_seqs).clamp_min(1).to(token_loss.dtype)
        return (per_seq / counts).sum() / max(norm.sequences, 1)
    if loss_type == "dapo":
        return token_loss.sum() / max(norm.tokens, 1)
    if loss_type == "dr_grpo":
        return token_loss.sum() / max(norm.sequences * norm.max_completion_length, 1)
    if loss_type == "bnpo":
        return token_loss.sum() / max(token_loss.numel(), 1) / max(norm.micro_batches, 1)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")

"""Sampling from tempered, optionally nucleus-truncated next-token distributions."""

from __future__ import annotations

import torch


def nucleus_keep(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """[..., V] bool: the smallest set of tokens whose probability reaches ``top_p``.

    The token that crosses the threshold is kept, so the set is never empty.
    """
    if top_p >= 1.0:
        return torch.ones_like(logits, dtype=torch.bool)
    probs, order = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each sorted token
    keep_sorted = before < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one token per row of ``logits`` [..., V] -> [...]; temperature 0 means argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_p < 1.0:
        scaled = scaled.masked_fill(~nucleus_keep(scaled, top_p), float("-inf"))
    probs = torch.softmax(scaled, dim=-1).reshape(-1, scaled.shape[-1])
    bad = ~torch.isfinite(probs).all(dim=-1)
    if bad.any():
        # Non-finite logits (diverged weights): draw uniformly so the step completes; its loss is then
        # non-finite too and the trainer skips the update.
        probs = torch.where(bad[:, None], torch.full_like(probs, 1.0 / probs.shape[-1]), probs)
    flat = torch.multinomial(probs, 1, generator=generator)
    return flat.reshape(scaled.shape[:-1])

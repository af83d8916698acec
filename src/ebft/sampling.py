"""Sampling from tempered, optionally truncated next-token distributions."""

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


def truncation_keep(logits: torch.Tensor, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> torch.Tensor:
    """[..., V] bool: the tokens a sampler may draw after top-k, then top-p, then min-p truncation.

    ``logits`` are already divided by the temperature. The order is that of transformers' logits
    warpers; each cut is taken on the distribution renormalised over what the previous cut kept.
    min-p keeps tokens with probability >= min_p * the largest probability. 0 disables top_k and min_p.
    The most likely token always survives, so the set is never empty.
    """
    keep = torch.ones_like(logits, dtype=torch.bool)
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        keep &= logits >= kth
    if top_p < 1.0:
        keep &= nucleus_keep(logits.masked_fill(~keep, float("-inf")), top_p)
    if min_p > 0.0:
        masked = logits.float().masked_fill(~keep, float("-inf"))
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p); renormalising does not change it.
        keep &= masked >= masked.amax(dim=-1, keepdim=True) + torch.log(torch.tensor(min_p))
    return keep


def invert_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [R, V] (non-negative, each row with some mass; rows need not sum to one), uniforms [R] in [0, 1] ->
    [R]: the first token whose cumulative mass exceeds ``uniforms * row total``, so token i is drawn with
    probability probs[i] / total.

    The running sum is in float64: in float32 the rounding of 49,152 partial sums can move a boundary by up to
    about V x 6e-8, a visible bias for rare tokens. A product that rounds up to the total (u = 1, or u just below
    it) is pulled back below it, so a token of zero mass is never drawn.
    """
    cdf = probs.double().cumsum(dim=-1)  # [R, V]
    total = cdf[:, -1:]
    target = torch.minimum(uniforms.double()[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one token per row of ``logits`` [..., V] -> [...]; temperature 0 means argmax.

    One uniform per row, inverted through the row's cumulative distribution (``invert_cdf``): exact, and
    one random number per row rather than one per vocabulary entry (``torch.multinomial`` draws an
    exponential for every entry, 17% of strided generation at the paper's settings).
    """
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
    uniforms = torch.rand(probs.shape[0], generator=generator, dtype=torch.float64, device=probs.device)
    return invert_cdf(probs, uniforms).reshape(scaled.shape[:-1])

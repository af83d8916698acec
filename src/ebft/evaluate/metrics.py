"""Evaluation arithmetic (pure): unbiased CFM estimate, best-of-n, token masks, CE totals, pass@k.

Shape letters: D documents, L tokens per document (right padded), n samples per group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# Per-document sums that ``summarise`` turns into the reported metrics.
SUM_KEYS = (
    "samples",  # (block, sample) pairs
    "blocks",  # (block) groups
    "cfm_blocks",  # groups with an unbiased CFM estimate (n >= 2)
    "alignment",
    "diversity",
    "reward",
    "best_alignment",  # sum over groups of the best alignment among the n samples
    "best_reward",
    "cfm",
    "ce_sum",
    "tokens",
    "answer_ce_sum",
    "answer_tokens",
)


def cfm_unbiased(alignment: torch.Tensor, diversity: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of the conditional feature-matching loss ||E phi(y_hat) - phi(y)||^2 per group.

    alignment, diversity: ``[..., n]`` with a_i = 2 cos(phi_i, y) and d_i = 2/(n-1) sum_{j != i} <phi_i, phi_j>,
    computed on unit-norm, unwhitened features (so ||y|| = ||phi_i|| = 1). Returns ``[...]``.

    Expanding ||E phi - y||^2 = ||E phi||^2 - 2 <E phi, y> + 1 and replacing ||E phi||^2 by the mean of
    <phi_i, phi_j> over ordered pairs i != j (unbiased; the i = j terms would add ||phi_i||^2 = 1) gives
    1 - mean_i (a_i - d_i / 2)  (paper eq. 2; docs/design.md §5.5). Needs n >= 2.
    """
    if alignment.shape != diversity.shape:
        raise ValueError(f"alignment {tuple(alignment.shape)} and diversity {tuple(diversity.shape)} differ")
    if alignment.shape[-1] < 2:
        raise ValueError("the unbiased CFM estimate needs at least 2 samples per group")
    return 1.0 - (alignment - diversity / 2).mean(-1)


def best_of_n(values: torch.Tensor) -> torch.Tensor:
    """``[..., n] -> [...]``: the best sample of each group (an oracle pick, not a decoding strategy)."""
    return values.amax(-1)


def next_token_masks(
    lengths: torch.Tensor, labels: torch.Tensor, prompt_length: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which next-token predictions count, as ``[D, L-1]`` bool masks over targets 1..L-1.

    Column p is the prediction of token p+1 from the prefix up to p.

    * ``all``: every real target, p+1 < lengths[d] (padding is never a target).
    * ``answer``: real targets with labels[p+1] != -100 and, where the row has a prompt
      (prompt_length >= 0), p+1 >= prompt_length.
    """
    D, L = labels.shape
    target = torch.arange(1, L, device=labels.device)[None, :]  # [1, L-1]
    real = target < lengths[:, None]
    labelled = labels[:, 1:] != -100
    after_prompt = (prompt_length[:, None] < 0) | (target >= prompt_length[:, None])
    return real, real & labelled & after_prompt


def perplexity(ce: float | None) -> float | None:
    """exp(CE); +inf instead of an overflow error for a hopeless model, None when there is no CE."""
    if ce is None:
        return None
    return math.exp(ce) if ce < 700 else math.inf


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def summarise(sums: Mapping[str, float]) -> dict[str, float | None]:
    """Reported metrics from summed per-document totals (``SUM_KEYS``); None where nothing was counted.

    Alignment, diversity and reward are means over all (block, sample) pairs; the best-of-n values and
    the CFM loss are means over blocks; CE is token-weighted.
    """
    ce = _ratio(sums["ce_sum"], sums["tokens"])
    answer_ce = _ratio(sums["answer_ce_sum"], sums["answer_tokens"])
    return {
        "alignment": _ratio(sums["alignment"], sums["samples"]),
        "diversity": _ratio(sums["diversity"], sums["samples"]),
        "reward": _ratio(sums["reward"], sums["samples"]),
        "alignment_best_of_n": _ratio(sums["best_alignment"], sums["blocks"]),
        "reward_best_of_n": _ratio(sums["best_reward"], sums["blocks"]),
        "cfm_loss": _ratio(sums["cfm"], sums["cfm_blocks"]),
        "ce_loss": ce,
        "perplexity": perplexity(ce),
        "answer_ce_loss": answer_ce,
        "answer_perplexity": perplexity(answer_ce),
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct among ``n`` samples (Chen et al., 2021).

    1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement from the n include a
    correct one. The ratio is computed as the product prod_{i=n-c+1}^{n} (1 - k/i), which never forms
    the (huge) binomial coefficients.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_pass_at_k(results: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as (n samples, c correct) pairs."""
    if not results:
        raise ValueError("no problems to average")
    return sum(pass_at_k(n, c, k) for n, c in results) / len(results)


@dataclass(frozen=True)
class Comparison:
    """Paired comparison of two models on the same documents.

    diff: mean over documents of (b - a); stderr: its standard error; winner: "a", "b" or "tie".
    """

    diff: float
    stderr: float
    winner: str


def compare_paired(a: Sequence[float], b: Sequence[float], *, higher_is_better: bool, z: float = 2.0) -> Comparison:
    """Which of two models is better on a per-document metric, with noise taken into account.

    ``a[j]`` and ``b[j]`` are the two models' values on document j. The winner is the better one when
    |mean(b - a)| > z * stderr(b - a) (about 95% for z = 2), else "tie". With fewer than two documents
    the standard error is unknown (inf) and the verdict is always "tie".
    """
    if len(a) != len(b):
        raise ValueError(f"need the same documents for both models, got {len(a)} and {len(b)} values")
    diffs = [float(y) - float(x) for x, y in zip(a, b, strict=True)]
    m = len(diffs)
    if m == 0:
        raise ValueError("no documents to compare")
    mean = sum(diffs) / m
    if m < 2:
        return Comparison(diff=mean, stderr=math.inf, winner="tie")
    var = sum((x - mean) ** 2 for x in diffs) / (m - 1)
    stderr = math.sqrt(var / m)
    if abs(mean) <= z * stderr:
        return Comparison(diff=mean, stderr=stderr, winner="tie")
    b_better = mean > 0 if higher_is_better else mean < 0
    return Comparison(diff=mean, stderr=stderr, winner="b" if b_better else "a")


def new_sums() -> dict[str, float]:
    """Zeroed per-document sums, one per ``SUM_KEYS`` entry."""
    return dict.fromkeys(SUM_KEYS, 0.0)

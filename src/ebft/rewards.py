"""Feature-matching rewards and advantages for groups of n samples (docs/design.md §5; paper eqs. 2, 7, 8).

A *group* is the n samples that share one ground truth: one prompt in structured mode, one
(document, block) pair in strided mode. Shape letters: G groups, n samples per group, E feature size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ebft.choices import (
    ADVANTAGE_ESTIMATORS,
    REWARD_SCALINGS,
    WHITENING_SPACES,
    AdvantageEstimator,
    RewardScaling,
    WhiteningSpace,
    single_sample_fallback,
)

# Singular values at or below this fraction of the group's largest are treated as zero (the paper
# code's tolerance). It is what turns exact duplicates into a rank-deficient group.
SINGULAR_RTOL = 1e-5
# Added to the group standard deviation in group_norm so constant rewards give 0, not NaN.
GROUP_NORM_EPS = 1e-6
_NORM_EPS = 1e-12


@dataclass(frozen=True)
class RewardTerms:
    """Per-sample reward parts of G groups of n samples (all float32).

    alignment: ``[G, n]`` 2 * cos(phi_i, phi_gt).
    diversity: ``[G, n]`` 2/(n-1) * sum_{j != i} <phi_i, phi_j> (0 when n == 1).
    reward: ``[G, n]`` alignment_coef * alignment - diversity_coef * diversity.
    cfm: ``[G]`` ||mean_i phi_i - mean_i phi_gt_i||^2 (conditional feature-matching loss, logged only).
    """

    alignment: torch.Tensor
    diversity: torch.Tensor
    reward: torch.Tensor
    cfm: torch.Tensor


def _check_group_shapes(gen: torch.Tensor, gt: torch.Tensor) -> None:
    if gen.ndim != 3 or gt.shape != (gen.shape[0], gen.shape[2]):
        raise ValueError(f"expected gen [G, n, E] and gt [G, E], got {tuple(gen.shape)} and {tuple(gt.shape)}")


def whiten(gen: torch.Tensor, gt: torch.Tensor, space: WhiteningSpace = "feature") -> tuple[torch.Tensor, torch.Tensor]:
    """Whiten each group of samples by the pseudo-inverse square root of its second moment.

    gen: ``[G, n, E]`` sample features; gt: ``[G, E]`` ground-truth feature of each group.
    Returns ``(gen_w [G, n, E], gt_w [G, n, E])`` in float32.

    Per group, with X = gen[g] = U diag(s) Vh (thin SVD; only s_i > SINGULAR_RTOL * max(s) kept):

    * ``feature`` (paper eq. 8): x -> x W with W = Vh^T diag(1/s) Vh, the pseudo-inverse square root
      of X^T X. gen_w = U Vh (orthonormal rows when X has rank n); gt_w is gt projected onto the
      span of the samples and rescaled, identical in all n rows.
    * ``sample`` (the paper code's row-space operator): M = U diag(1/s) U^T applied from the left,
      so gen_w = M X (the same as above) and gt_w[i] = (sum_j M_ij) * gt, a multiple of the raw gt.

    n << E, so the decomposition goes through the n x n Gram matrix X X^T = U diag(s^2) U^T in
    float64: eigenvalue errors of ~1e-16 * max(s)^2 give s to ~1e-8 * max(s), well inside the
    1e-5 tolerance, so exact duplicates are dropped reliably. A group of zero vectors maps to zeros.
    W is never materialised (it would be E x E).
    """
    _check_group_shapes(gen, gt)
    if space not in WHITENING_SPACES:
        raise ValueError(f"unknown whitening_space {space!r}; expected one of {WHITENING_SPACES}")
    x = gen.double()  # [G, n, E]
    y = gt.double()[:, None, :]  # [G, 1, E]

    eigvals, u = torch.linalg.eigh(x @ x.mT)  # [G, n], [G, n, n]; columns of u are left singular vectors
    s = eigvals.clamp_min(0.0).sqrt()  # [G, n]
    keep = s > SINGULAR_RTOL * s.amax(-1, keepdim=True)  # all False for an all-zero group
    inv_s = torch.where(keep, 1.0 / torch.where(keep, s, 1.0), 0.0)  # [G, n]; 0 on dropped directions

    if space == "feature":
        vh = inv_s[..., None] * (u.mT @ x)  # [G, n, E]; rows of dropped directions are zero

        def apply_w(z: torch.Tensor) -> torch.Tensor:  # z [G, m, E] -> z W [G, m, E]
            return ((z @ vh.mT) * inv_s[:, None, :]) @ vh

        gen_w = apply_w(x)
        gt_w = apply_w(y).expand_as(x)
    else:
        m = (u * inv_s[:, None, :]) @ u.mT  # [G, n, n] = U diag(1/s) U^T
        gen_w = m @ x
        gt_w = m.sum(-1)[..., None] * y  # [G, n, 1] * [G, 1, E]
    return gen_w.float(), gt_w.float().contiguous()


def duplicate_sources(ids: torch.Tensor) -> torch.Tensor:
    """For every sample, the first sample of its group with exactly the same tokens.

    ids: ``[G, n, L]`` token ids of each sample (callers pad unequal lengths with a value that is no
    token id, e.g. -1, so that only equal sequences compare equal). Returns ``[G, n]`` long, entry j
    the smallest i with ``ids[g, i] == ids[g, j]`` (j itself when the sample is unique).
    """
    if ids.ndim != 3:
        raise ValueError(f"expected ids [G, n, L], got {tuple(ids.shape)}")
    same = (ids[:, :, None, :] == ids[:, None, :, :]).all(-1)  # [G, n, n]; the diagonal is always True
    return same.int().argmax(-1)  # argmax returns the first maximum


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x ``[G, n, ...]``, index ``[G, n]`` -> ``x[g, index[g, j], ...]``."""
    return x.gather(1, index.reshape(*index.shape, *([1] * (x.ndim - 2))).expand_as(x))


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise along the last dim; zero vectors stay zero."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_NORM_EPS)


def reward_terms(
    gen: torch.Tensor,
    gt: torch.Tensor,
    *,
    alignment_coef: float,
    diversity_coef: float,
    use_whitening: bool,
    whitening_space: WhiteningSpace = "feature",
    same_as: torch.Tensor | None = None,
) -> RewardTerms:
    """Alignment, diversity and reward of every sample, and the CFM loss of every group.

    gen: ``[G, n, E]`` pooled sample features; gt: ``[G, E]`` pooled ground-truth features.
    Without whitening the vectors are first L2-normalised; with whitening they are whitened
    (``whiten``) and not normalised again. The reward is paper eq. 7 (axolotl's variant (i),
    eq. 49): cosine for alignment, raw dot products for diversity, both scaled by 2.

    same_as: ``[G, n]`` from ``duplicate_sources``: samples with identical tokens take their source's
    feature row, so that precision noise between copies (bf16 features of the same tokens computed at
    different positions) is not amplified by whitening into unrelated rewards; their per-sample terms
    are then copied from the source too, so copies score bit for bit alike whatever order the matrix
    kernels sum in.
    """
    _check_group_shapes(gen, gt)
    n = gen.shape[1]
    if same_as is not None:
        gen = _take(gen, same_as)
    if use_whitening:
        phi, phi_gt = whiten(gen, gt, whitening_space)  # [G, n, E] each
    else:
        phi = _unit(gen.float())
        phi_gt = _unit(gt.float())[:, None, :].expand_as(phi)

    alignment = 2.0 * (_unit(phi) * _unit(phi_gt)).sum(-1)  # [G, n]
    if n > 1:
        gram = phi @ phi.mT  # [G, n, n]
        off_diagonal = gram.sum(-1) - gram.diagonal(dim1=-2, dim2=-1)  # [G, n]
        diversity = 2.0 / (n - 1) * off_diagonal
    else:
        diversity = torch.zeros_like(alignment)
    if same_as is not None:
        alignment, diversity = _take(alignment, same_as), _take(diversity, same_as)
    reward = alignment_coef * alignment - diversity_coef * diversity
    # Plug-in estimate of eq. 2 on the same vectors the reward sees.
    cfm = (phi.mean(1) - phi_gt.mean(1)).square().sum(-1)  # [G]
    return RewardTerms(alignment=alignment, diversity=diversity, reward=reward, cfm=cfm)


class RewardKeys(Protocol):
    """The reward keys of a mode's settings (``ebft.alignment_coef`` and the rest) that ``reward_terms_for`` reads."""

    @property
    def alignment_coef(self) -> float: ...

    @property
    def diversity_coef(self) -> float: ...

    @property
    def use_whitening(self) -> bool: ...

    @property
    def whitening_space(self) -> WhiteningSpace: ...


def reward_terms_for(
    gen: torch.Tensor, gt: torch.Tensor, keys: RewardKeys, same_as: torch.Tensor | None = None
) -> RewardTerms:
    """``reward_terms`` with the coefficients and whitening of ``keys``: what training (both modes) and
    evaluation score with."""
    return reward_terms(
        gen,
        gt,
        alignment_coef=keys.alignment_coef,
        diversity_coef=keys.diversity_coef,
        use_whitening=keys.use_whitening,
        whitening_space=keys.whitening_space,
        same_as=same_as,
    )


def advantages(
    terms: RewardTerms,
    estimator: AdvantageEstimator,
    alignment_coef: float,
    diversity_coef: float,
) -> torch.Tensor:
    """Advantage of every sample, ``[G, n]``.

    * ``rloo``: reward minus an exact leave-one-out baseline that never depends on sample i. The
      alignment baseline is the mean of the other n-1 alignments, (S_a - a_i)/(n-1). The diversity
      baseline is the mean diversity the other samples would get in the group without i, which
      simplifies to (S_d - 2 d_i)/(n-2) (0 for n = 2, where a lone sample has no diversity).
      The coefficients must be those used to build ``terms``.
    * ``group_norm``: (r - mean r)/(std r + 1e-6) over the n samples, unbiased std.
    * ``reinforce``: the reward itself.

    With n == 1 there is nothing to compare against: ``choices.single_sample_fallback`` (``rloo`` and
    ``group_norm`` become ``reinforce``; the config warns about it); the diversity term is then 0 anyway.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage_estimator {estimator!r}; expected one of {ADVANTAGE_ESTIMATORS}")
    r = terms.reward
    n = r.shape[-1]
    estimator, diversity_coef = single_sample_fallback(n, estimator, diversity_coef)
    if estimator == "reinforce":
        return r.clone()
    if estimator == "group_norm":
        return (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + GROUP_NORM_EPS)

    a, d = terms.alignment, terms.diversity
    base_a = (a.sum(-1, keepdim=True) - a) / (n - 1)
    base_d = (d.sum(-1, keepdim=True) - 2.0 * d) / (n - 2) if n > 2 else torch.zeros_like(d)
    return alignment_coef * (a - base_a) - diversity_coef * (d - base_d)


# Added to the standard deviation in group_advantages (TRL's constant) so a constant group gives 0.
SCALE_EPS = 1e-4


def group_advantages(reward: torch.Tensor, scale: RewardScaling, batch_std: float | None = None) -> torch.Tensor:
    """Structured-mode (GRPO) advantages of G groups of n completions: reward minus its group mean.

    reward: ``[G, n]``. ``scale`` (``trl.scale_rewards``): ``group`` divides by each group's standard
    deviation + 1e-4, ``batch`` by ``batch_std`` + 1e-4 (the standard deviation of every reward in the
    rollout batch, across processes, which the caller computes), ``none`` leaves the centred reward.
    Standard deviations are unbiased (n - 1).
    """
    if scale not in REWARD_SCALINGS:
        raise ValueError(f"unknown scale_rewards {scale!r}; expected one of {REWARD_SCALINGS}")
    centred = reward - reward.mean(-1, keepdim=True)
    if scale == "group":
        return centred / (reward.std(-1, keepdim=True) + SCALE_EPS)
    if scale == "batch":
        if batch_std is None:
            raise ValueError("scale_rewards 'batch' needs the batch standard deviation")
        return centred / (batch_std + SCALE_EPS)
    return centred

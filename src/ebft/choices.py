"""The choices a config makes for the math, each defined once: the config validates against these types and
the math modules (``features``, ``rewards``, ``losses``) check their arguments against the same tuples.

Also the one rule that follows from a group of a single sample, which the strided settings apply, the reward
math honours and the config warns about. Pure python (no torch), so that the config can import it.
"""

from __future__ import annotations

from typing import Literal, get_args

PoolMethod = Literal["last_token", "mean_pooling", "completion_mean", "concat"]
FeatureNorm = Literal["per_layer", "joint", "none"]
WhiteningSpace = Literal["feature", "sample"]
AdvantageEstimator = Literal["rloo", "group_norm", "reinforce"]
RewardScaling = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]

POOL_METHODS: tuple[str, ...] = get_args(PoolMethod)
FEATURE_NORMS: tuple[str, ...] = get_args(FeatureNorm)
WHITENING_SPACES: tuple[str, ...] = get_args(WhiteningSpace)
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)
REWARD_SCALINGS: tuple[str, ...] = get_args(RewardScaling)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


def single_sample_fallback(
    n: int, estimator: AdvantageEstimator, diversity_coef: float
) -> tuple[AdvantageEstimator, float]:
    """The advantage estimator and diversity weight that a group of ``n`` samples actually uses.

    One sample has nothing to be compared with: no diversity term (weight 0) and no baseline, so ``rloo``
    and ``group_norm`` fall back to ``reinforce`` (advantage = raw reward). With n >= 2 both are as given.
    """
    if n > 1:
        return estimator, diversity_coef
    return "reinforce", 0.0

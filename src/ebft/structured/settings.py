"""The ``trl:`` and ``ebft:`` keys structured mode reads (:class:`StructuredSettings`), and the token
budget of one completion."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ebft.choices import FeatureNorm, LossType, PoolMethod, RewardScaling, WhiteningSpace
from ebft.config import TrainConfig
from ebft.structured.rollout import Sampling

# Adaptive max tokens never cuts a completion below this many tokens (or max_completion_length when
# that is smaller): a very short ground truth should not stop the policy from saying anything.
ADAPTIVE_FLOOR = 64


@dataclass(frozen=True)
class StructuredSettings:
    """The ``trl:`` and ``ebft:`` keys the structured step reads."""

    num_generations: int
    max_completion_length: int
    adaptive_max_tokens: bool
    gt_length_multiplier: float
    sampling: Sampling
    embed_method: PoolMethod
    feature_norm: FeatureNorm
    use_whitening: bool
    whitening_space: WhiteningSpace
    alignment_coef: float
    diversity_coef: float
    scale_rewards: RewardScaling
    loss_type: LossType
    eps_low: float
    eps_high: float
    num_iterations: int
    mask_truncated_completions: bool
    skip_zero_advantage_batches: bool
    is_correction: bool
    is_bounds: tuple[float, float]
    rl_coef: float
    ce_coef: float
    sequence_len: int
    chat_template_kwargs: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: TrainConfig, eos_token_id: int | None) -> StructuredSettings:
        t, e = cfg.trl, cfg.ebft
        return cls(
            num_generations=t.num_generations,
            max_completion_length=t.max_completion_length,
            adaptive_max_tokens=e.adaptive_max_tokens,
            gt_length_multiplier=e.gt_length_multiplier,
            sampling=Sampling.from_trl(t, eos_token_id),
            embed_method=e.embed_method,
            feature_norm=e.feature_norm,
            use_whitening=e.use_whitening,
            whitening_space=e.whitening_space,
            alignment_coef=e.alignment_coef,
            diversity_coef=e.diversity_coef,
            scale_rewards=t.scale_rewards,
            loss_type=t.loss_type,
            eps_low=t.epsilon,
            eps_high=t.clip_high,
            num_iterations=t.num_iterations,
            mask_truncated_completions=t.mask_truncated_completions,
            skip_zero_advantage_batches=t.skip_zero_advantage_batches,
            is_correction=t.use_vllm and t.vllm_importance_sampling_correction,
            is_bounds=t.importance_weight_bounds,
            rl_coef=e.rl_coef,
            ce_coef=e.ce_coef,
            sequence_len=cfg.sequence_len,
            chat_template_kwargs=dict(t.chat_template_kwargs or {}),
        )

    @property
    def logprob_temperature(self) -> float:
        # Greedy decoding has no tempered density; the untempered policy is scored instead.
        return self.sampling.temperature if self.sampling.temperature > 0 else 1.0


def completion_cap(gt_tokens: int, s: StructuredSettings) -> int:
    """Token budget of one completion: ``max_completion_length``, or with ``adaptive_max_tokens``
    ceil(gt_length_multiplier x ground-truth tokens), at least min(64, max_completion_length)."""
    if not s.adaptive_max_tokens:
        return s.max_completion_length
    wanted = max(math.ceil(s.gt_length_multiplier * gt_tokens), ADAPTIVE_FLOOR)
    return min(s.max_completion_length, wanted)

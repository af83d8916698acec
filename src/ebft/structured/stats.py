"""The statistics of structured steps: sums over micro-batches, processes and logged steps, and the metrics
logged from them (``ebft/*`` as axolotl's EBFT trainer names them, the rest as TRL does)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ebft.train.stats import StepStats, minimum


@dataclass
class StructuredStats(StepStats):
    """Per rollout batch (counted once per step that trains on it): ``samples`` completions in ``groups``
    prompts, their reward terms, advantages and CFM loss, ``completion_tokens`` generated and ``truncated``
    completions. Per micro-batch: ``rl_loss`` (the aggregated surrogate), ``rl_tokens`` loss tokens, their
    ``entropy`` and clipped counts, ``ce_sum`` (the CE numerator; ``ce_tokens`` its step-global
    denominator), the importance ratios of tokens with sampler log-probs (``is_ratio_min`` their smallest raw
    ratio), the ``skipped_micro_batches`` and ``loss``, the trained loss."""

    samples: float = 0.0
    groups: float = 0.0
    alignment: float = 0.0
    diversity: float = 0.0
    reward: float = 0.0
    reward_sq: float = 0.0
    advantage: float = 0.0
    advantage_sq: float = 0.0
    cfm: float = 0.0
    completion_tokens: float = 0.0
    truncated: float = 0.0
    rl_loss: float = 0.0
    rl_tokens: float = 0.0
    entropy: float = 0.0
    clip_low: float = 0.0
    clip_high: float = 0.0
    ce_sum: float = 0.0
    ce_tokens: float = 0.0
    is_ratio_sum: float = 0.0
    is_tokens: float = 0.0
    is_ratio_min: float = minimum()
    skipped_micro_batches: float = 0.0
    loss: float = 0.0

    def metrics(self, steps: int, seconds: float, *, ce: bool, skipping: bool) -> dict[str, float]:
        """Means over ``steps`` logged steps. ``ce``: the run has a CE term (``ebft/ce_loss`` is logged);
        ``skipping``: it skips zero-advantage micro-batches (``skipped_micro_batches`` is logged)."""
        samples = max(self.samples, 1.0)
        steps = max(steps, 1)
        reward_mean = self.reward / samples
        adv_mean = self.advantage / samples
        rl_tokens = max(self.rl_tokens, 1.0)
        out = {
            "ebft/alignment": self.alignment / samples,
            "ebft/diversity": self.diversity / samples,
            "ebft/reward": reward_mean,
            "ebft/reward_std": math.sqrt(max(self.reward_sq / samples - reward_mean**2, 0.0)),
            "ebft/cfm_loss": self.cfm / max(self.groups, 1.0),
            "ebft/advantages_std": math.sqrt(max(self.advantage_sq / samples - adv_mean**2, 0.0)),
            "ebft/rl_loss": self.rl_loss / steps,
            "completions/mean_length": self.completion_tokens / samples,
            "completions/clipped_ratio": self.truncated / samples,
            "entropy": self.entropy / rl_tokens,
            "clip_ratio/low_mean": self.clip_low / rl_tokens,
            "clip_ratio/high_mean": self.clip_high / rl_tokens,
            "loss": self.loss / steps,
            "tokens_per_second": self.completion_tokens / max(seconds, 1e-9),
        }
        if ce:
            out["ebft/ce_loss"] = self.ce_sum / max(self.ce_tokens, 1.0)
        if self.is_tokens > 0:
            out["is_ratio/mean"] = self.is_ratio_sum / self.is_tokens
            out["is_ratio/min"] = self.is_ratio_min
        if skipping:
            out["skipped_micro_batches"] = self.skipped_micro_batches / steps
        return out

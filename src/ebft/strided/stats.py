"""The statistics of strided steps: sums over micro-batches, processes and logged steps, and the metrics
logged from them (the names axolotl's EBFT trainer logs in strided mode)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ebft.train.stats import StepStats


@dataclass
class StridedStats(StepStats):
    """Sums over the valid (document, block) slots of the steps seen. ``samples`` counts (block, sample)
    pairs, ``rl_tokens`` their generated tokens, ``ce_tokens`` the labelled targets of the CE term (0 without
    it), ``doc_tokens`` the documents' real tokens; ``rl_sum`` and ``ce_sum`` are the RL and CE losses before
    their division by the step's token counts, ``loss`` the step loss as trained."""

    blocks: float = 0.0
    docs: float = 0.0
    samples: float = 0.0
    alignment: float = 0.0
    diversity: float = 0.0
    reward: float = 0.0
    advantage: float = 0.0
    advantage_sq: float = 0.0
    cfm: float = 0.0
    rl_sum: float = 0.0
    rl_tokens: float = 0.0
    ce_sum: float = 0.0
    ce_tokens: float = 0.0
    doc_tokens: float = 0.0
    loss: float = 0.0

    def metrics(self, rl_coef: float, ce_coef: float, seconds: float) -> dict[str, float]:
        """The logged means. Every mean is a ratio of two sums, so the number of steps is not needed;
        ``loss`` is recomputed from the token-mean RL and CE losses with the coefficients of the run."""
        samples = max(self.samples, 1.0)
        adv_mean = self.advantage / samples
        rl_loss = self.rl_sum / max(self.rl_tokens, 1.0)
        out = {
            "ebft/alignment": self.alignment / samples,
            "ebft/diversity": self.diversity / samples,
            "ebft/mean_reward": self.reward / samples,
            "ebft/cfm_loss": self.cfm / max(self.blocks, 1.0),
            "ebft/rl_loss": rl_loss,
            "ebft/advantages_std": math.sqrt(max(self.advantage_sq / samples - adv_mean**2, 0.0)),
            "ebft/num_blocks": self.blocks / max(self.docs, 1.0),
        }
        loss = rl_coef * rl_loss
        if ce_coef > 0:
            out["ebft/ce_loss"] = self.ce_sum / max(self.ce_tokens, 1.0)
            loss += ce_coef * out["ebft/ce_loss"]
        out["loss"] = loss
        out["tokens_per_second"] = (self.doc_tokens + self.rl_tokens) / max(seconds, 1e-9)
        return out

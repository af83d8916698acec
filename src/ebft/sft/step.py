"""One SFT micro-batch: teacher-forced cross-entropy on every labelled target, divided by the step's targets.

The loss of a step is the mean NLL over every labelled target (labels != -100) of all its micro-batches on
all processes: each micro-batch back-propagates its NLL sum divided by that step-global count, so summed
gradients do not depend on how the step is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebft.data.collate import DocumentBatch
from ebft.losses import token_logprobs
from ebft.modeling.parts import backbone_of, output_head
from ebft.modeling.precision import autocast
from ebft.train.distributed import Sharding
from ebft.train.stats import StepStats


@dataclass
class SftStats(StepStats):
    """``ce_sum``: the NLL summed over ``targets`` labelled targets; ``tokens``: the documents' real tokens."""

    ce_sum: float = 0.0
    targets: float = 0.0
    tokens: float = 0.0

    def metrics(self, seconds: float) -> dict[str, float]:
        """The loss is the cross-entropy per target over the logged steps (``loss`` and ``ce_loss`` alike)."""
        ce = self.ce_sum / max(self.targets, 1.0)
        return {"loss": ce, "ce_loss": ce, "tokens_per_second": self.tokens / max(seconds, 1e-9)}


def target_count(batch: DocumentBatch) -> int:
    """Labelled targets of a micro-batch: token p + 1 is a target when its label is not -100."""
    return int((batch.labels[:, 1:] != -100).sum())


def ce_microbatch(
    sharding: Sharding, batch: DocumentBatch, step_targets: int, autocast_dtype: torch.dtype | None
) -> SftStats:
    """Back-propagate the micro-batch's NLL / ``step_targets`` into the policy's ``.grad``; its statistics.

    Rows are right-padded and attention is causal, so padding after a document does not reach its tokens.
    """
    mask = batch.labels[:, 1:] != -100  # [D, L-1]: target p + 1 is predicted at position p

    def forward(policy: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(batch.input_ids.device, autocast_dtype):
            hidden = backbone_of(policy)(input_ids=batch.input_ids, use_cache=False).last_hidden_state  # [D, L, H]
            logp = token_logprobs(hidden[:, :-1][mask], batch.input_ids[:, 1:][mask], output_head(policy))
        return logp, hidden

    logp, hidden = sharding.grad_pass(forward)
    nll = -logp.sum()
    # Without targets the pass still back-propagates (zero), so that under FSDP every process reduces alike.
    loss = nll / max(step_targets, 1) if bool(mask.any()) else 0.0 * hidden.sum()
    loss.backward()
    return SftStats(ce_sum=float(nll.detach()), targets=float(mask.sum()), tokens=float(batch.lengths.sum()))

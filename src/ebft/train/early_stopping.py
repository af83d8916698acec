"""Early stopping and the best model (pure): what each evaluation during training decides.

The rules are transformers' (``EarlyStoppingCallback``, ``load_best_model_at_end``):

* an evaluation improves when its ``metric_for_best_model`` is strictly better than the best so far (a NaN
  never is); the evaluation before the first step (``eval_on_start``) is a baseline, logged but compared with
  nothing, as in transformers;
* ``early_stopping_patience`` evaluations in a row without improvement stop the run;
* the best model is chosen among the evaluations whose weights are kept: those of a written checkpoint, and the
  last step's (the weights the run ends with). save_steps a multiple of the evaluation interval (checked with
  the config) makes every checkpoint an evaluated one.

The record is saved with every checkpoint, so a resumed run continues it exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ebft.config.evaluation import BestMetric


@dataclass
class EvalRecord:
    """What the evaluations of a run decided so far (``TrainState.evaluation`` holds it as a dict).

    best_value / best_step: the best evaluation after a training step; bad_evals: evaluations since then that
    did not improve on it; last_step / last_metrics: the latest evaluation (``eval/`` names); kept_step /
    kept_metrics: the best evaluation that has a checkpoint (None: none yet)."""

    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    last_step: int | None = None
    last_metrics: dict = field(default_factory=dict)
    kept_step: int | None = None
    kept_metrics: dict = field(default_factory=dict)

    def saved(self) -> dict:
        return asdict(self)


def observe(record: EvalRecord, metric: BestMetric, step: int, metrics: dict) -> None:
    """Take in the evaluation of ``step`` (its ``eval/`` metrics); a missing metric changes no count."""
    record.last_step, record.last_metrics = step, dict(metrics)
    value = metrics.get(metric.name)
    if step == 0 or value is None:
        return
    if metric.better(value, record.best_value):
        record.best_value, record.best_step, record.bad_evals = value, step, 0
    else:
        record.bad_evals += 1


def stops(record: EvalRecord, patience: int | None) -> bool:
    """Whether ``patience`` evaluations in a row have not improved on the best."""
    return patience is not None and record.bad_evals >= patience


def checkpointed(record: EvalRecord, metric: BestMetric, step: int) -> None:
    """A checkpoint of ``step`` was written: it becomes the kept model when it was evaluated at that step and
    beats the kept one."""
    if record.last_step != step or step == 0:
        return
    value = record.last_metrics.get(metric.name)
    kept = record.kept_metrics.get(metric.name) if record.kept_step is not None else None
    if value is not None and metric.better(value, kept):
        record.kept_step, record.kept_metrics = step, dict(record.last_metrics)


def final_checkpoint(record: EvalRecord, metric: BestMetric, last_step: int) -> int | None:
    """The step of the checkpoint to hand over instead of the last step's weights, or None: the kept checkpoint
    when the last step was not evaluated, or was evaluated and is not strictly better than it."""
    if record.kept_step is None or record.kept_step == last_step:
        return None
    if record.last_step != last_step:
        return record.kept_step
    value = record.last_metrics.get(metric.name)
    kept = record.kept_metrics.get(metric.name)
    if value is not None and metric.better(value, kept):
        return None
    return record.kept_step

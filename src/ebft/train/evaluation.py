"""Evaluation during training: when it runs, how it leaves training untouched, and what it decides.

The mode's ``Evaluator`` (``ebft.train.runner``) scores the held-out rows with ``ebft evaluate``'s scoring on the
policy as it is after a step and the run's frozen feature network (docs/design.md §8). Around it this module:

* picks the rows once: at most ``eval_max_docs`` spread evenly over the held-out set, the same at every
  evaluation (``spread_indices``, as ``ebft evaluate --max-docs``);
* splits them over processes: each scores a contiguous share (its rows keep their places, so their seeds do
  not depend on the split) and the sums are added on every process (one collective), so all processes log and
  decide the same;
* leaves training as it was: the policy in eval mode (every submodule gets its own flag back), no gradient,
  under FSDP on gathered weights, and the random state of every generator saved before and restored after, so a
  run with evaluation trains exactly as one without;
* applies early stopping and keeps the best model (``ebft.train.early_stopping``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ebft.config import TrainConfig
from ebft.config.evaluation import PREFIX, BestMetric, best_metric, eval_interval, held_out_config, interval_problem
from ebft.deploy.card import FinalModel
from ebft.errors import ConfigError, EbftError
from ebft.modeling.feature_network import eval_mode
from ebft.train import early_stopping as stopping
from ebft.train.batches import reduce_sum, spread_indices
from ebft.train.checkpoint import rng_state, set_rng_state
from ebft.train.runner import Evaluator

log = logging.getLogger("ebft")


def share(count: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of process ``rank``'s contiguous share of ``count`` rows; shares differ by one row at most."""
    return rank * count // world, (rank + 1) * count // world


@contextmanager
def untouched(model: torch.nn.Module) -> Iterator[None]:
    """The policy in eval mode without gradient; afterwards its modules' flags and every random state (python,
    numpy, torch, CUDA) are as before."""
    saved = rng_state()
    try:
        with eval_mode(model), torch.no_grad():
            yield
    finally:
        set_rng_state(saved)


def held_out_rows(cfg: TrainConfig, mode, data, tokenizer, config_dir: Path | None):
    """The rows evaluation during training scores: the ``test_datasets`` rows (read by the mode's loader, so
    transformed and checked like the training rows), else those ``val_set_size`` held out of the training data.
    Returns (rows, what they are in words)."""
    if cfg.test_datasets:
        return mode.load_data(held_out_config(cfg), tokenizer, search_dir=config_dir).train, "test_datasets rows"
    return data.val, f"validation rows (val_set_size={cfg.val_set_size:g})"


class Evaluation:
    """The evaluation of one run: ``due`` says when, ``run`` evaluates, ``observe`` decides whether to stop,
    ``checkpointed`` and ``final_checkpoint`` keep the best model. ``record`` is ``TrainState.evaluation``."""

    def __init__(
        self, cfg: TrainConfig, evaluator: Evaluator, *, accelerator, model, sharding, total_steps: int, record: dict
    ):
        self.evaluator, self.accelerator, self.model, self.sharding = evaluator, accelerator, model, sharding
        interval = eval_interval(cfg, total_steps)
        if interval is None:
            raise ConfigError("evaluation during training: no eval_steps, evals_per_epoch or eval_strategy: epoch set")
        self.interval = interval
        problem = interval_problem(cfg, self.interval)
        if problem is not None:
            raise ConfigError(f"save_steps: {problem}")
        if len(evaluator) == 0:
            raise EbftError(
                "evaluation during training: the held-out rows are empty; raise val_set_size or check test_datasets"
            )
        self.indices = spread_indices(len(evaluator), cfg.eval_max_docs)
        self.on_start = cfg.eval_on_start is not False
        self.patience = cfg.early_stopping_patience
        choosing = cfg.early_stopping_patience is not None or cfg.load_best_model_at_end
        self.metric = best_metric(cfg) if choosing else None
        self.load_best = cfg.load_best_model_at_end
        self.record = stopping.EvalRecord(**record)
        self.stopped_at: int | None = None

    def describe(self, rows: str) -> str:
        """One line for the log: when, on what, with which model."""
        start = ", before the first step" if self.on_start else ""
        line = (
            f"evaluation during training every {self.interval} steps and at the last step{start}: "
            f"{len(self.indices)} of the {len(self.evaluator)} {rows} (eval_max_docs), policy in eval mode, "
            "scored with the run's frozen feature network"
        )
        if self.metric is not None:
            direction = "higher" if self.metric.greater_is_better else "lower"
            line += f"; {self.metric.name} ({direction} is better) decides"
            line += f" early stopping after {self.patience} evaluations without improvement" if self.patience else ""
            line += " and the best model" if self.load_best else ""
        return line

    def due(self, step: int, last: bool) -> bool:
        """Whether step ``step`` ends with an evaluation (every ``interval`` steps and at the last one)."""
        return last or step % self.interval == 0

    def run(self, progress) -> dict[str, float | None]:
        """The ``eval/`` metrics of the policy as it is now, the same on every process (all must call it)."""
        acc = self.accelerator
        start, end = share(len(self.indices), acc.process_index, acc.num_processes)
        started = time.perf_counter()
        with untouched(self.model), self.sharding.gathered(), progress.task("eval", end - start) as bar:
            sums = self.evaluator.score(self.indices[start:end], start, bar)
        keys = sorted(sums)
        total = reduce_sum(acc, torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=acc.device))
        metrics = self.evaluator.summarise(dict(zip(keys, total.tolist(), strict=True)))
        out = {PREFIX + key: value for key, value in metrics.items()}
        out[PREFIX + "seconds"] = time.perf_counter() - started
        return out

    def observe(self, step: int, metrics: dict, last: bool = False) -> bool:
        """Take in the evaluation of ``step``; True when early stopping ends the run here, before its ``last``
        step (``stop_reason`` says why)."""
        if self.metric is None:
            return False
        if metrics.get(self.metric.name) is None and step > 0:
            log.warning("step %d: the evaluation has no %s; it counts for nothing", step, self.metric.name)
        stopping.observe(self.record, self.metric, step, metrics)
        if step == 0 or last or not stopping.stops(self.record, self.patience):
            return False
        self.stopped_at = step
        return True

    def _deciding(self) -> BestMetric:
        """The metric that decides: what early stopping and load_best_model_at_end ask for, which __init__ sets
        whenever either is on."""
        assert self.metric is not None
        return self.metric

    def stop_reason(self) -> str:
        """Why early stopping ended the run, in a sentence."""
        r = self.record
        return (
            f"Training stopped early at step {self.stopped_at}: {self._deciding().name} had not improved on its best, "
            f"{r.best_value:.6g} at step {r.best_step}, for {r.bad_evals} evaluations (early_stopping_patience)."
        )

    def final_model(self, steps: int, chosen: int | None) -> FinalModel:
        """What the run card says of the final model: the last step's weights, or checkpoint ``chosen``'s."""
        stopped = self.stop_reason() if self.stopped_at is not None else None
        r = self.record
        if chosen is not None:
            metric = self._deciding()
            better = "higher" if metric.greater_is_better else "lower"
            reason = (
                f"checkpoint-{chosen}, the best {metric.name} ({better} is better) among the evaluated "
                "checkpoints and the last step (load_best_model_at_end)"
            )
            return FinalModel(chosen, steps, reason, _shown(r.kept_metrics), stopped)
        evaluation = _shown(r.last_metrics) if r.last_step == steps else {}
        reason = "the last step" + (
            ", the best of the evaluated checkpoints (load_best_model_at_end)" if self.load_best else ""
        )
        return FinalModel(steps, steps, reason, evaluation, stopped)

    def checkpointed(self, step: int) -> None:
        if self.load_best:
            stopping.checkpointed(self.record, self._deciding(), step)

    def protected(self, out_dir: Path) -> Path | None:
        """The checkpoint ``save_total_limit`` must keep: the best one, with load_best_model_at_end."""
        if not self.load_best or self.record.kept_step is None:
            return None
        return out_dir / f"checkpoint-{self.record.kept_step}"

    def final_checkpoint(self, last_step: int) -> int | None:
        """With load_best_model_at_end, the step whose checkpoint is handed over instead of the last step."""
        if not self.load_best:
            return None
        return stopping.final_checkpoint(self.record, self._deciding(), last_step)


def _shown(metrics: dict) -> dict:
    """An evaluation's metrics as the run card shows them (how long it took is not a property of the model)."""
    return {k: v for k, v in metrics.items() if k != PREFIX + "seconds"}

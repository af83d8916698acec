"""Evaluation during training, early stopping and the best model: the checks of their keys (no model, no data)
and what follows from them once the run's length is known.

The keys are transformers' and axolotl's: ``eval_steps`` / ``evals_per_epoch`` / ``eval_strategy`` say when,
``val_set_size`` or ``test_datasets`` on what, ``early_stopping_patience`` with ``metric_for_best_model`` and
``greater_is_better`` when to stop, ``load_best_model_at_end`` which weights the run hands over. Metric names
are the ``eval/`` metrics of ``ebft evaluate`` (``ebft.evaluate.output.held_out_metrics``); transformers'
spellings ``eval_cfm_loss`` and ``cfm_loss`` mean ``eval/cfm_loss``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from ebft.evaluate.output import held_out_metrics

PREFIX = "eval/"
# The metric early stopping and load_best_model_at_end compare when metric_for_best_model is unset: the
# feature-matching loss EBFT minimises (paper eq. 2).
DEFAULT_METRIC = "eval/cfm_loss"


def metric_name(value: str) -> str:
    """A metric as written in a config -> its logged name: ``eval_cfm_loss``, ``cfm_loss`` -> ``eval/cfm_loss``."""
    for prefix in (PREFIX, "eval_"):
        if value.startswith(prefix):
            return PREFIX + value[len(prefix) :]
    return PREFIX + value


def has_held_out(cfg) -> bool:
    """Whether the config holds rows out for evaluation: ``val_set_size`` > 0 or ``test_datasets``."""
    return cfg.val_set_size > 0 or bool(cfg.test_datasets)


def schedule_set(cfg) -> bool:
    """Whether the keys ask for evaluation during training (before asking whether there are rows for it)."""
    if cfg.eval_strategy == "no":
        return False
    return cfg.eval_steps is not None or cfg.evals_per_epoch is not None or cfg.eval_strategy is not None


def evaluates(cfg) -> bool:
    """Whether training evaluates on held-out rows: a schedule, and rows to evaluate."""
    return schedule_set(cfg) and has_held_out(cfg)


def held_out_config(cfg):
    """``cfg`` reading its ``test_datasets`` as its datasets, nothing held out of them: the loaders then give
    the test rows as their training rows."""
    return cfg.model_copy(update={"datasets": list(cfg.test_datasets), "val_set_size": 0.0})


@dataclass(frozen=True)
class BestMetric:
    """What early stopping and load_best_model_at_end compare: the logged name and its direction."""

    name: str
    greater_is_better: bool

    def better(self, value: float, than: float | None) -> bool:
        """Strictly better than ``than`` (None: nothing yet, so any number is); NaN never is."""
        if math.isnan(value):
            return False
        if than is None:
            return True
        return value > than if self.greater_is_better else value < than


def best_metric(cfg) -> BestMetric:
    """The configured (or default) metric and its direction; the config's checks guarantee both exist."""
    name = metric_name(cfg.metric_for_best_model or DEFAULT_METRIC)
    if cfg.greater_is_better is not None:
        return BestMetric(name, cfg.greater_is_better)
    return BestMetric(name, held_out_metrics(cfg.ebft.mode)[name[len(PREFIX) :]] == "higher")


def eval_interval(cfg, total_steps: int) -> int | None:
    """Optimizer steps between evaluations in a run of ``total_steps``; None: no evaluation during training.

    ``eval_steps`` >= 1 is the interval; a fraction of the run is rounded up (transformers). ``evals_per_epoch``
    (``eval_strategy: epoch`` is one per epoch) gives ``total_steps / (evals_per_epoch * num_epochs)`` rounded
    up, as axolotl computes it, num_epochs as configured also when max_steps sets the length.
    """
    if not evaluates(cfg):
        return None
    if cfg.eval_steps is not None:
        steps = cfg.eval_steps if cfg.eval_steps >= 1 else math.ceil(cfg.eval_steps * total_steps)
        return max(1, int(steps))
    per_epoch = cfg.evals_per_epoch or 1
    return max(1, math.ceil(total_steps / (per_epoch * cfg.num_epochs)))


def interval_problem(cfg, interval: int | None) -> str | None:
    """load_best_model_at_end's rule on save_steps once the interval is known: every checkpoint is evaluated."""
    if not cfg.load_best_model_at_end or interval is None or cfg.save_steps is None:
        return None
    if cfg.save_steps % interval:
        return (
            f"with load_best_model_at_end, a multiple of the evaluation interval ({interval} steps here), so that "
            f"every checkpoint is evaluated, as in transformers (got {cfg.save_steps})"
        )
    return None


def evaluation_problems(cfg) -> list[tuple[str, str]]:
    """Cross-field checks of the evaluation keys, as (key path, reason)."""
    problems: list[tuple[str, str]] = []
    if cfg.test_datasets and cfg.val_set_size > 0:
        problems.append(
            ("test_datasets", f"set test_datasets or val_set_size, not both (got val_set_size={cfg.val_set_size:g})")
        )
    if cfg.eval_steps is not None and cfg.evals_per_epoch is not None:
        problems.append(("evals_per_epoch", "set eval_steps or evals_per_epoch, not both"))
    if cfg.eval_steps is not None and cfg.eval_steps > 1 and cfg.eval_steps != int(cfg.eval_steps):
        problems.append(
            (
                "eval_steps",
                f"a whole number of steps (>= 1) or a fraction of the run in (0, 1) (got {cfg.eval_steps})",
            )
        )
    schedule = "eval_steps" if cfg.eval_steps is not None else "evals_per_epoch" if cfg.evals_per_epoch else None
    if schedule and cfg.eval_strategy in ("no", "epoch"):
        problems.append(
            ("eval_strategy", f"{cfg.eval_strategy} conflicts with {schedule}; leave eval_strategy empty or 'steps'")
        )
    if cfg.eval_strategy == "steps" and schedule is None:
        problems.append(("eval_strategy", "steps needs eval_steps (or evals_per_epoch) to say how often"))
    stopping = [k for k in ("early_stopping_patience", "load_best_model_at_end") if getattr(cfg, k)]
    for key in stopping if not evaluates(cfg) else []:
        missing = "held-out rows (val_set_size or test_datasets)" if schedule_set(cfg) else "eval_steps"
        problems.append((key, f"compares evaluations during training, which need {missing}"))
    if cfg.load_best_model_at_end and cfg.save_steps is None:
        problems.append(
            ("load_best_model_at_end", "needs checkpoints to choose from: set save_steps (a multiple of eval_steps)")
        )
    if cfg.eval_steps is not None and cfg.eval_steps >= 1:
        problem = interval_problem(cfg, int(cfg.eval_steps))
        problems += [("save_steps", problem)] if problem else []
    if stopping:
        problems += _metric_problems(cfg)
    return problems


def _metric_problems(cfg) -> list[tuple[str, str]]:
    known = held_out_metrics(cfg.ebft.mode)
    name = metric_name(cfg.metric_for_best_model or DEFAULT_METRIC)
    short = name[len(PREFIX) :]
    if short not in known:
        listed = [PREFIX + k for k in known]
        close = difflib.get_close_matches(name, listed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        return [
            (
                "metric_for_best_model",
                f"{name} is not an evaluation metric; {hint}a {cfg.ebft.mode} run evaluates {', '.join(listed)}",
            )
        ]
    problems = []
    if cfg.greater_is_better is None and known[short] == "-":
        problems.append(("greater_is_better", f"{name} is neither a loss nor a score; say which way is better"))
    strided_single = cfg.ebft.mode == "strided" and cfg.ebft.n_samples_per_prompt < 2
    if short == "cfm_loss" and strided_single:
        problems.append(
            (
                "metric_for_best_model",
                f"{name} needs ebft.n_samples_per_prompt >= 2 (the unbiased estimate compares samples); "
                "choose another, e.g. eval/ce_loss",
            )
        )
    return problems


def evaluation_warnings(cfg) -> list[str]:
    """Evaluation keys that change nothing with the config's other values."""
    out: list[str] = []
    if schedule_set(cfg) and not has_held_out(cfg):
        key = (
            "eval_steps"
            if cfg.eval_steps is not None
            else "evals_per_epoch"
            if cfg.evals_per_epoch
            else "eval_strategy"
        )
        out.append(
            f"{key}: no evaluation during training: there are no held-out rows (val_set_size is 0 and no "
            "test_datasets); set one of them"
        )
    if not (cfg.early_stopping_patience or cfg.load_best_model_at_end):
        out += [
            f"{key}: has no effect without early_stopping_patience or load_best_model_at_end"
            for key in ("metric_for_best_model", "greater_is_better")
            if getattr(cfg, key) is not None
        ]
    if cfg.eval_on_start is not None and not evaluates(cfg):
        out.append("eval_on_start: has no effect without evaluation during training (eval_steps and held-out rows)")
    return out

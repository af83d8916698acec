"""Early stopping and the best model, by hand (``ebft.train.early_stopping``), and what keeps an evaluation from
touching training: the per-process shares, the restored random state and module flags, the best checkpoint's
protection from rotation."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ebft.config.evaluation import BestMetric
from ebft.train import checkpoint as ckpt
from ebft.train.early_stopping import EvalRecord, checkpointed, final_checkpoint, observe, stops
from ebft.train.evaluation import share, untouched

LOWER = BestMetric("eval/cfm_loss", greater_is_better=False)
HIGHER = BestMetric("eval/reward", greater_is_better=True)


def _run(metric: BestMetric, values: dict[int, float | None], patience: int) -> tuple[EvalRecord, int | None]:
    """Feed evaluations in step order; the step early stopping stops at (None: it never does)."""
    record = EvalRecord()
    for step, value in values.items():
        observe(record, metric, step, {metric.name: value})
        if step > 0 and stops(record, patience):
            return record, step
    return record, None


def test_patience_counts_evaluations_without_strict_improvement():
    # step 0 is the baseline (compared with nothing); 2: best 0.9; 4: 0.95 worse (1); 6: 0.9 equal, not better (2).
    record, stopped = _run(LOWER, {0: 0.1, 2: 0.9, 4: 0.95, 6: 0.9, 8: 0.5}, patience=2)
    assert stopped == 6
    assert (record.best_value, record.best_step, record.bad_evals) == (0.9, 2, 2)


def test_an_improvement_resets_the_count():
    # 2: 0.9 best; 4: 1.0 (1); 6: 0.8 best again (0); 8: 0.85 (1); 10: 0.85 (2) -> stop at 10 with patience 2.
    record, stopped = _run(LOWER, {2: 0.9, 4: 1.0, 6: 0.8, 8: 0.85, 10: 0.85}, patience=2)
    assert stopped == 10 and record.best_step == 6


def test_higher_is_better_and_nan_never_improves():
    record, stopped = _run(HIGHER, {1: 0.1, 2: 0.3, 3: math.nan, 4: 0.2}, patience=2)
    assert stopped == 4 and (record.best_value, record.best_step) == (0.3, 2)


def test_a_missing_value_counts_for_nothing():
    record, stopped = _run(LOWER, {1: 1.0, 2: None, 3: None, 4: 1.5}, patience=2)
    assert stopped is None and record.bad_evals == 1 and record.last_step == 4


def test_without_patience_nothing_stops():
    assert _run(LOWER, {1: 1.0, 2: 2.0, 3: 3.0}, patience=None)[1] is None  # type: ignore[arg-type]


def _evaluated(record: EvalRecord, metric: BestMetric, step: int, value: float, saved: bool) -> None:
    observe(record, metric, step, {metric.name: value})
    if saved:
        checkpointed(record, metric, step)


def test_the_best_model_is_chosen_among_checkpointed_evaluations_and_the_last_step():
    record = EvalRecord()
    # Evaluated every 2 steps, checkpoints every 4: step 2's 0.5 is the best evaluation but has no checkpoint.
    _evaluated(record, LOWER, 2, 0.5, saved=False)
    _evaluated(record, LOWER, 4, 0.7, saved=True)
    _evaluated(record, LOWER, 6, 0.6, saved=False)
    _evaluated(record, LOWER, 8, 0.8, saved=True)
    assert (record.kept_step, record.kept_metrics) == (4, {"eval/cfm_loss": 0.7})
    assert record.best_step == 2  # early stopping still counts from the best evaluation
    _evaluated(record, LOWER, 9, 0.75, saved=False)  # the last step: worse than the kept 0.7
    assert final_checkpoint(record, LOWER, last_step=9) == 4
    _evaluated(record, LOWER, 9, 0.65, saved=False)  # better than the kept one: the last step's own weights
    assert final_checkpoint(record, LOWER, last_step=9) is None


def test_the_last_step_is_kept_when_it_is_the_kept_checkpoint_or_nothing_was_kept():
    record = EvalRecord()
    _evaluated(record, LOWER, 4, 0.7, saved=True)
    assert final_checkpoint(record, LOWER, last_step=4) is None
    assert final_checkpoint(EvalRecord(), LOWER, last_step=4) is None
    # A checkpoint written at a step that was not evaluated is not a candidate.
    record = EvalRecord()
    observe(record, LOWER, 2, {"eval/cfm_loss": 0.1})
    checkpointed(record, LOWER, 3)
    assert record.kept_step is None


def test_the_record_round_trips_through_a_checkpoint_state():
    record = EvalRecord()
    _evaluated(record, LOWER, 2, 0.5, saved=True)
    _evaluated(record, LOWER, 4, 0.6, saved=False)
    assert EvalRecord(**record.saved()) == record


@pytest.mark.parametrize(
    ("count", "world", "shares"),
    [
        (10, 1, [(0, 10)]),
        (10, 2, [(0, 5), (5, 10)]),
        (7, 2, [(0, 3), (3, 7)]),  # 7 * 1 // 2 = 3
        (2, 3, [(0, 0), (0, 1), (1, 2)]),  # a process may have nothing to score; it still takes part
    ],
)
def test_shares_cover_the_rows_once_in_order(count, world, shares):
    assert [share(count, rank, world) for rank in range(world)] == shares


def test_evaluation_leaves_random_state_and_module_flags_as_they_were():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    model.train()
    model[2].eval()  # a submodule with its own flag: restoring one flag for the tree would lose it
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with untouched(model):
        assert not any(m.training for m in model.modules()) and not torch.is_grad_enabled()
        random.random(), np.random.rand(), torch.rand(5)  # draws an evaluation might make
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert torch.is_grad_enabled()


def test_rotation_keeps_the_best_checkpoint(tmp_path):
    def make(*steps):
        for step in steps:
            folder = tmp_path / f"checkpoint-{step}"
            folder.mkdir()
            (folder / ckpt.STATE_FILE).write_text("{}")

    make(2, 4, 6, 8)
    ckpt.rotate(tmp_path, 2, protected=tmp_path / "checkpoint-2")
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-8"]
    make(10)
    # save_total_limit 1: the best and the newest (resuming needs it), as in transformers.
    ckpt.rotate(tmp_path, 1, protected=tmp_path / "checkpoint-2")
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    ckpt.rotate(tmp_path, 1, protected=None)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-10"]

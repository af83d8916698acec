"""The quickstart report's words and curves: EBFT's objective on its training rollouts, and the time budget."""

from __future__ import annotations

import pytest

from ebft.quickstart.report import time_sentences, training_objective


def test_training_objective_is_the_unbiased_cfm_without_whitening():
    records = [
        {"step": 1, "ebft/alignment": 1.8, "ebft/diversity": 1.84, "ebft/cfm_loss": 0.14},
        {"step": 2, "ebft/alignment": 1.9, "ebft/diversity": 1.9, "ebft/cfm_loss": 0.07},
        {"step": 3, "loss": 0.5},  # a record without rollout metrics is skipped
    ]
    title, (steps, values) = training_objective(records, whitened=False)
    assert "unbiased" in title and steps == [1, 2]
    # 1 - (1.8 - 1.84 / 2) = 0.12; 1 - (1.9 - 0.95) = 0.05.
    assert values == pytest.approx([0.12, 0.05])
    # With whitening a and d are whitened: only the logged plug-in value of the whitened vectors is shown.
    title, (steps, values) = training_objective(records, whitened=True)
    assert "whitened" in title and values == [0.14, 0.07]


def _summary(spent: float, cuts: list[str]) -> dict:
    return {
        "minutes": 8,
        "seconds": {"corpus + base model": 3.0, "report": 2.0, "total": spent + 5.0},
        "budget": {
            "seconds": 480.0,
            "spent_seconds": spent,
            "fixed_seconds": {"corpus + base model": 3.0},
            "slowdown_guess": 2.0,
            "slowdown": 2.5,
            "floors": {"steps": 2, "heldout_docs": 2, "probe_docs": 0},
            "cuts": cuts,
        },
    }


def test_time_sentences_state_planned_and_actual_time_cuts_and_overrun():
    on_time = time_sentences(_summary(500.0, ["fine-tuning steps 28 -> 11"]))
    assert on_time[0].startswith("Time: --minutes 8 budgets 8.0 min for the planned phases")
    assert "they took 8.3 min, plus 5 s of fixed costs" in on_time[0]
    assert "2.5x slower than the plan's idle single-thread costs (first guess 2.0x)" in on_time[0]
    assert on_time[1] == "Cut to fit the budget: fine-tuning steps 28 -> 11."
    assert len(on_time) == 2  # 500 s is within 10% of 480 s: no overrun sentence
    late = time_sentences(_summary(600.0, []))
    assert len(late) == 2 and late[1].startswith("The planned phases overran the budget by 2.0 min")
    assert "(2 steps of each run, 2 held-out documents)" in late[1]

"""The quickstart's budget planner (``quickstart.budget``) against a fake clock: a simulated machine that runs
every unit ``slowdown`` times slower than the idle costs, the planner re-planning as ``run_quickstart``
does (steps before fine-tuning, documents before the evaluation)."""

from __future__ import annotations

import pytest

from ebft.quickstart.budget import (
    Budget,
    Floors,
    Sizes,
    UnitCosts,
    evaluation_seconds,
    fit_evaluation,
    fit_steps,
    predicted_seconds,
    training_seconds,
)

COSTS = UnitCosts(ebft_step=12.0, sft_step=1.5, eval_doc=5.0, model=2.0)
IDEAL = Sizes(steps=28, heldout_docs=6, probe_docs=2, curve_points=4)


def simulate(minutes: float, slowdown: float, guess: float) -> tuple[float, Budget, Sizes, int]:
    """One run on a machine ``slowdown`` times slower than the costs; the planner starts from ``guess``.
    Returns (seconds spent, the budget, the evaluation sizes, the steps)."""
    clock = 0.0
    budget = Budget(seconds=60 * minutes, start=clock, ideal=IDEAL, costs=COSTS, guess=guess)
    steps = budget.plan_steps(clock)
    for cost in (COSTS.ebft_step, COSTS.sft_step):  # EBFT, then SFT for the same steps
        wall = steps * cost * slowdown
        clock += wall
        budget.record(steps * cost, wall)
    sizes = budget.plan_evaluation(clock, steps, IDEAL.curve_points)
    clock += evaluation_seconds(sizes, COSTS, slowdown)
    return clock, budget, sizes, steps


def test_costs_add_up():
    # Training: 28 x (12 + 1.5) = 378 s. Evaluation: 3 x (6 x 5 + 2 x 2) = 102 s, probes (1 + 4) x (2 x 5 + 2)
    # = 60 s. Total 540 s, twice as long at slowdown 2.
    assert training_seconds(28, COSTS) == 378.0
    assert evaluation_seconds(IDEAL, COSTS) == 162.0
    assert predicted_seconds(IDEAL, COSTS, 2.0) == 1080.0


def test_an_idle_machine_runs_the_ideal_plan():
    spent, budget, sizes, steps = simulate(minutes=9.0, slowdown=1.0, guess=1.0)
    assert (steps, sizes) == (IDEAL.steps, IDEAL)
    assert budget.cuts == []
    assert spent == 540.0 <= 9 * 60


@pytest.mark.parametrize("slowdown", [1.5, 2.0, 3.0, 5.0])
def test_a_busy_machine_cuts_steps_and_documents_to_end_on_time(slowdown):
    """The machine is busy from the start and the guess says so: the run ends within 10% of the budget."""
    spent, budget, sizes, steps = simulate(minutes=9.0, slowdown=slowdown, guess=slowdown)
    assert spent <= 1.1 * 9 * 60
    assert steps < IDEAL.steps and any(cut.startswith("fine-tuning steps 28 ->") for cut in budget.cuts)
    assert budget.slowdown == pytest.approx(slowdown)
    assert sizes.heldout_docs >= 2


def test_a_slowdown_met_during_training_is_absorbed_by_the_evaluation():
    """The guess was 1 but the machine ran 1.3x slower: training overran its share by 30%, so the
    evaluation is cut (its documents) and the run still ends within 10% of the budget."""
    spent, budget, sizes, steps = simulate(minutes=9.0, slowdown=1.3, guess=1.0)
    assert steps == IDEAL.steps
    assert sizes.heldout_docs < IDEAL.heldout_docs or sizes.probe_docs < IDEAL.probe_docs
    assert budget.cuts and spent <= 1.1 * 9 * 60


def test_a_budget_too_small_for_the_floors_runs_them_and_says_what_was_cut():
    spent, budget, sizes, steps = simulate(minutes=0.5, slowdown=3.0, guess=3.0)
    floors = Floors()
    assert steps == floors.steps
    assert (sizes.heldout_docs, sizes.probe_docs) == (floors.heldout_docs, floors.probe_docs)
    # Floors: 2 x 13.5 x 3 = 81 s of training, 3 x (2 x 5 + 4) x 3 = 126 s of evaluation.
    assert spent == pytest.approx(207.0)
    assert "fine-tuning steps 28 -> 2" in budget.cuts
    assert "probe documents 2 per curve point -> no held-out curves" in budget.cuts


def test_fit_steps_keeps_trainings_share_and_never_exceeds_the_plan():
    # The ideal plan spends 378 / 540 = 70% on training; 300 s at slowdown 2 give 210 s / 27 s = 7 steps.
    assert fit_steps(300.0, IDEAL, COSTS, 2.0, Floors()) == 7
    assert fit_steps(10_000.0, IDEAL, COSTS, 1.0, Floors()) == IDEAL.steps
    assert fit_steps(0.0, IDEAL, COSTS, 1.0, Floors(steps=3)) == 3


def test_fit_evaluation_drops_the_probes_before_the_documents():
    # Six documents: 3 x (6 x 5 + 2 x 2) = 102 s, with the probes (1 + 4) x (2 x 5 + 2) = 60 s more (162 s).
    # Five documents: 87 s, with probes scaled to 5/6 (1 document per point) 35 s more (122 s).
    assert fit_evaluation(162.0, IDEAL, COSTS, 1.0, Floors()) == IDEAL
    assert fit_evaluation(130.0, IDEAL, COSTS, 1.0, Floors()) == Sizes(28, 6, 0, 4)
    assert fit_evaluation(100.0, IDEAL, COSTS, 1.0, Floors()) == Sizes(28, 5, 0, 4)
    assert fit_evaluation(1.0, IDEAL, COSTS, 1.0, Floors()) == Sizes(28, 2, 0, 4)
    assert fit_evaluation(1.0, IDEAL, COSTS, 1.0, Floors(probe_docs=1)) == Sizes(28, 2, 1, 4)


def test_the_measured_slowdown_replaces_the_guess():
    budget = Budget(seconds=100.0, start=0.0, ideal=IDEAL, costs=COSTS, guess=4.0)
    assert budget.slowdown == 4.0
    budget.record(predicted_idle=10.0, wall=25.0)
    assert budget.slowdown == 2.5
    budget.record(predicted_idle=10.0, wall=1.0)  # a phase much faster than its prediction: floored at 1/2
    assert budget.slowdown == pytest.approx(26.0 / 20.0)
    assert Budget(seconds=1.0, start=0.0, ideal=IDEAL, costs=COSTS, guess=0.1).slowdown == 0.5
    assert budget.remaining(now=150.0) == 0.0

"""The quickstart's budget planner (``quickstart.budget``) against a fake clock: a simulated machine that runs
every unit ``slowdown`` times slower than the idle costs, the planner re-planning as ``run_quickstart``
does (steps before fine-tuning, documents before the evaluation)."""

from __future__ import annotations

import pytest

from ebft.quickstart.budget import (
    PRETRAINED_COSTS,
    SCRATCH_COSTS,
    Budget,
    Floors,
    Plan,
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
    for cost in (COSTS.ebft_step, COSTS.sft_step):  # EBFT, then SFT for the same steps, each loading its model
        wall = (steps * cost + COSTS.model) * slowdown
        clock += wall
        budget.record(steps * cost + COSTS.model, wall)
    sizes = budget.plan_evaluation(clock, steps, IDEAL.curve_points)
    clock += evaluation_seconds(sizes, COSTS, slowdown)
    return clock, budget, sizes, steps


def test_costs_add_up():
    # Training: 28 x (12 + 1.5) = 378 s of steps and 2 x 2 s of model loads, 382 s. Evaluation: 3 x (6 x 5 +
    # 2 x 2) = 102 s, probes (1 + 4) x (2 x 5 + 2) = 60 s. Total 544 s, twice as long at slowdown 2.
    assert training_seconds(28, COSTS) == 382.0
    assert evaluation_seconds(IDEAL, COSTS) == 162.0
    assert predicted_seconds(IDEAL, COSTS, 2.0) == 1088.0


def test_an_idle_machine_runs_the_ideal_plan():
    spent, budget, sizes, steps = simulate(minutes=9.5, slowdown=1.0, guess=1.0)
    assert (steps, sizes) == (IDEAL.steps, IDEAL)
    assert budget.cuts == []
    assert spent == 544.0 <= 9.5 * 60


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
    # Floors: (2 x 13.5 + 2 x 2) x 3 = 93 s of training, 3 x (2 x 5 + 4) x 3 = 126 s of evaluation.
    assert spent == pytest.approx(219.0)
    assert "fine-tuning steps 28 -> 2" in budget.cuts
    assert "probe documents 2 per curve point -> no held-out curves" in budget.cuts


def test_fit_steps_keeps_trainings_share_and_never_exceeds_the_plan():
    # The ideal plan spends 382 / 544 = 70% on training; 300 s at slowdown 2 give 211 s / 27 s = 7 steps.
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


def test_the_smallest_pretrained_plan_and_whether_it_fits():
    # SmolLM2's floors: 2 steps x (13 + 1.5) + 2 model loads x 2 = 33 s of training, 3 x (2 x 6 + 2 x 2) = 48 s
    # of evaluation, no probes: 81 s idle. Half a minute fits it on no machine; eight minutes fit it unless
    # 6.5x slower (1.1 x 480 / 81 = 6.52).
    assert UnitCosts(ebft_step=13.0, sft_step=1.5, eval_doc=6.0, model=2.0) == PRETRAINED_COSTS
    assert Plan.for_pretrained(0.5).floor_seconds(1.0) == pytest.approx(81.0)
    assert Plan.for_pretrained(0.5).floor_seconds(2.0) == pytest.approx(162.0)
    assert not Plan.for_pretrained(0.5).fits(1.0)
    assert Plan.for_pretrained(8).fits(6.5) and not Plan.for_pretrained(8).fits(6.6)


def test_pretraining_leaves_the_smallest_rest_of_the_run_its_time():
    # From scratch, half a minute: floors 2 x (0.84 + 0.12) + 2 x 0.3 = 2.52 s of training, 3 x (4 x 0.12 +
    # 2 x 0.3) = 3.24 s of evaluation, no probes: 5.76 s idle. The cap: the planned 45 s per minute (22.5 s) on
    # an idle machine (30 - 5.76 = 24.24 s would be more), 30 - 5.76 x 3 = 12.72 s at slowdown 3, and at 6 a
    # tenth of the budget (3 s, more than 30 - 34.56).
    plan = Plan.for_minutes(0.5)
    assert plan.costs == SCRATCH_COSTS
    assert plan.floor_seconds(1.0) == pytest.approx(5.76)
    assert plan.pretrain_cap(1.0) == pytest.approx(22.5)
    assert plan.pretrain_cap(3.0) == pytest.approx(12.72)
    assert plan.pretrain_cap(6.0) == pytest.approx(3.0)
    assert Plan.for_minutes(8).pretrain_cap(3.0) == 45.0 * 8  # a long budget keeps its planned cap


def test_pretraining_stops_on_the_slowdown_its_own_steps_measure():
    plan = Plan.for_minutes(0.5)
    now = [0.0]
    budget = plan.budget(start=100.0, guess=1.0)
    time_up = budget.pretrain_time_up(plan, clock=lambda: 100.0 + now[0])
    # 70 steps in 21 s: 0.3 s each, as planned (slowdown 1), so the cap is 22.5 s from the budget's start,
    # set-up included: 22.4 s spent go on, 22.6 s stop.
    now[0] = 22.4
    assert not time_up(70, 21.0)
    now[0] = 22.6
    assert time_up(70, 21.0)
    # 1 step in 1.8 s: slowdown 6, so the cap is a tenth of the budget (3 s): 2.9 s spent go on; 3.1 s (the
    # set-up took 1.3 s) stop.
    now[0] = 2.9
    assert not time_up(1, 1.8)
    now[0] = 3.1
    assert time_up(1, 1.8)

"""The quickstart's time budget, re-planned from measured wall time as the run goes.

Everything here is arithmetic on measured seconds (so it is tested with a fake clock), except
``contention``, the one measurement made before anything else has run.

The budget (``--minutes``) covers the phases whose size the plan chooses: pretraining (from-scratch path
only, capped at 1.5x its planned time and at what the smallest rest of the run leaves, on the slowdown its
own steps measure), fine-tuning (EBFT first, then SFT for the number of steps EBFT
reached), the held-out evaluation of the three models with the example block, and the held-out curves
(probes of the saved checkpoints). Reading the corpus, converting the base model and writing the report are
fixed costs outside it.

Each phase is a number of units (optimizer steps, documents, model loads) with a cost per unit measured on
an idle machine, one thread (``UnitCosts``); a busy or slower machine runs every unit ``slowdown`` times
slower. The planner starts from a measured guess of the slowdown (how much slower than its CPU time a
short workload ran), replaces it by the measured slowdown of each finished phase, and sizes what is left
to the time that is left: fewer steps before fine-tuning, fewer held-out and probe documents before the
evaluation. Floors (``Floors``) keep the run meaningful; a run that cannot fit even them overruns, and
the cuts and the overrun are reported (the quickstart trains the from-scratch model instead of a found
pretrained one whose floors cannot fit: ``Plan.fits``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ebft.errors import EbftError

EVALUATED_MODELS = 3  # base, SFT, EBFT
TRAINING_RUNS = 2  # EBFT, SFT: each loads its model once
# The evaluation phase loads each model twice (evaluation, example block) and samples the example block once.
LOADS_PER_MODEL = 2


@dataclass(frozen=True)
class UnitCosts:
    """Wall seconds per unit on an idle machine, one thread.

    ebft_step, sft_step: one optimizer step (one run); eval_doc: one held-out document for one model
    (rollouts, scoring and cross-entropy); model: loading one model (for a training run: with its data and
    the final save), or sampling the example block from it."""

    ebft_step: float
    sft_step: float
    eval_doc: float
    model: float


@dataclass(frozen=True)
class Floors:
    """The smallest sizes worth a report: fine-tuning steps of each run, held-out documents (a paired
    standard error needs two), probe documents per curve point (0: no held-out curves)."""

    steps: int = 2
    heldout_docs: int = 2
    probe_docs: int = 0


@dataclass(frozen=True)
class Sizes:
    """Fine-tuning steps (each run), held-out documents of the final evaluation, probe documents per curve
    point, and curve points besides the base model (checkpoints of both runs together)."""

    steps: int
    heldout_docs: int
    probe_docs: int
    curve_points: int


# Idle single-thread wall seconds per unit: the CPU seconds per unit of quickstart runs on a quiet machine
# (summary.json's cpu_seconds; a process's CPU time is its single-thread wall time when nothing else runs).
# From scratch: the 1.6M Llama, 4 documents of 256 tokens per step. SmolLM2-135M: 128-token windows, one
# document per step, LoRA r16 (EBFT 28 steps 369 s, SFT 28 steps 42 s, 18 held-out document evaluations
# with 3 model loads 122 s).
SCRATCH_COSTS = UnitCosts(ebft_step=0.84, sft_step=0.12, eval_doc=0.12, model=0.3)
PRETRAINED_COSTS = UnitCosts(ebft_step=13.0, sft_step=1.5, eval_doc=6.0, model=2.0)
PRETRAIN_STEP_SECONDS = 0.3  # one pretraining step of the from-scratch model (16 x 256 tokens)


@dataclass(frozen=True)
class Plan:
    """Sizes for a time budget on an idle machine, before anything is measured (``Budget`` re-plans them).

    ``save_every``: the checkpoint interval, so that each run has ``points_per_run`` points on the curves."""

    minutes: float
    pretrain_steps: int
    pretrain_seconds_cap: float
    finetune_steps: int
    heldout_docs: int
    probe_docs: int
    points_per_run: int
    costs: UnitCosts
    floors: Floors

    @property
    def save_every(self) -> int:
        return max(1, self.finetune_steps // self.points_per_run)

    def budget(self, start: float, guess: float) -> Budget:
        """This plan's budget, started at ``start`` (a clock reading) with the slowdown ``guess``."""
        return Budget(60 * self.minutes, start, self.sizes(), self.costs, guess=guess, floors=self.floors)

    def with_steps(self, steps: int) -> Plan:
        return replace(self, finetune_steps=steps)

    def sizes(self) -> Sizes:
        """The plan as ``Sizes``, the ideal a ``Budget`` re-plans from."""
        return Sizes(self.finetune_steps, self.heldout_docs, self.probe_docs, self.curve_points(self.finetune_steps))

    def floor_seconds(self, slowdown: float = 1.0) -> float:
        """Wall seconds of the smallest plan (the floors) at ``slowdown``, pretraining aside."""
        floors = self.floors
        smallest = Sizes(floors.steps, floors.heldout_docs, floors.probe_docs, self.curve_points(floors.steps))
        return predicted_seconds(smallest, self.costs, slowdown)

    def fits(self, slowdown: float) -> bool:
        """Whether the smallest plan ends within the budget (10% over allowed) at ``slowdown``."""
        return self.floor_seconds(slowdown) <= 1.1 * 60 * self.minutes

    def pretrain_cap(self, slowdown: float) -> float:
        """Wall seconds pretraining may take at ``slowdown``, its set-up included: its planned cap, less what
        the smallest rest of the run needs, but never under a tenth of the budget (a base model that has read
        nothing makes no demo)."""
        budget = 60 * self.minutes
        return min(self.pretrain_seconds_cap, max(0.1 * budget, budget - self.floor_seconds(slowdown)))

    def curve_points(self, steps: int) -> int:
        """Models of both runs on the held-out curves after ``steps`` steps: the checkpoints saved every
        ``save_every`` steps before the last, and the final models."""
        every = max(1, steps // self.points_per_run)
        return 2 * (len(range(every, steps, every)) + 1)

    @classmethod
    def for_minutes(cls, minutes: float) -> Plan:
        """The from-scratch demo: per minute, 100 pretraining steps of 16 x 256 tokens (~30 s), 25 fine-tuning
        steps of 4 documents for each method (~21 s for EBFT, ~3 s for SFT), 10 held-out documents for the
        final evaluation of the three models and 2.5 for each checkpoint on the curves (~7 s together).
        Pretraining stops at 1.5x its expected time."""
        _check_minutes(minutes)
        return cls(
            minutes=minutes,
            pretrain_steps=max(4, round(100 * minutes)),
            pretrain_seconds_cap=45.0 * minutes,
            finetune_steps=max(2, round(25 * minutes)),
            heldout_docs=max(4, round(10 * minutes)),
            probe_docs=max(2, round(2.5 * minutes)),
            points_per_run=5,
            costs=SCRATCH_COSTS,
            # The curves are this demo's story and cost little on the small model: dropped only when even the
            # final evaluation's floor does not fit without them.
            floors=Floors(steps=2, heldout_docs=4, probe_docs=0),
        )

    @classmethod
    def for_pretrained(cls, minutes: float) -> Plan:
        """A pretrained ~135M model (no pretraining phase), ``PRETRAINED_COSTS``: per minute 3.5 fine-tuning
        steps for each method, 0.75 held-out documents for the final evaluation of the three models and 0.25
        for each of the five curve points (base, middle and end of each run)."""
        _check_minutes(minutes)
        return cls(
            minutes=minutes,
            pretrain_steps=0,
            pretrain_seconds_cap=0.0,
            finetune_steps=max(2, round(3.5 * minutes)),
            heldout_docs=max(2, round(0.75 * minutes)),
            probe_docs=max(1, round(0.25 * minutes)),
            points_per_run=2,
            costs=PRETRAINED_COSTS,
            floors=Floors(steps=2, heldout_docs=2, probe_docs=0),
        )


def _check_minutes(minutes: float) -> None:
    if not minutes > 0:
        raise EbftError(f"--minutes must be > 0, got {minutes:g}")


def contention(seconds: float = 0.2) -> float:
    """Wall time over CPU time of a short matrix-multiply workload (about ``seconds`` of CPU): about 1 on an
    idle machine with one thread, 1 / threads with several, more when other processes hold the cores. The
    first guess of ``Budget.slowdown``, since the idle costs are single-thread CPU times."""
    import torch

    a = torch.randn(384, 384)
    t0, c0 = time.perf_counter(), time.process_time()
    while time.process_time() - c0 < seconds:
        a = torch.tanh(a @ a)
    return (time.perf_counter() - t0) / max(time.process_time() - c0, 1e-9)


def training_seconds(steps: int, costs: UnitCosts, slowdown: float = 1.0) -> float:
    """Both fine-tuning runs."""
    return (steps * (costs.ebft_step + costs.sft_step) + TRAINING_RUNS * costs.model) * slowdown


def evaluation_seconds(sizes: Sizes, costs: UnitCosts, slowdown: float = 1.0) -> float:
    """The final evaluation with the example block, and the probes."""
    final = EVALUATED_MODELS * (sizes.heldout_docs * costs.eval_doc + LOADS_PER_MODEL * costs.model)
    probes = (1 + sizes.curve_points) * (sizes.probe_docs * costs.eval_doc + costs.model) if sizes.probe_docs else 0.0
    return (final + probes) * slowdown


def predicted_seconds(sizes: Sizes, costs: UnitCosts, slowdown: float = 1.0) -> float:
    return training_seconds(sizes.steps, costs, slowdown) + evaluation_seconds(sizes, costs, slowdown)


def fit_steps(seconds: float, ideal: Sizes, costs: UnitCosts, slowdown: float, floors: Floors) -> int:
    """Steps (each run) for ``seconds`` of remaining budget: training keeps the share of the time it has in
    the ideal plan, and never gets more steps than the ideal plan."""
    share = training_seconds(ideal.steps, costs) / predicted_seconds(ideal, costs)
    per_step = (costs.ebft_step + costs.sft_step) * slowdown
    return max(floors.steps, min(ideal.steps, math.floor(seconds * share / per_step)))


def fit_evaluation(seconds: float, ideal: Sizes, costs: UnitCosts, slowdown: float, floors: Floors) -> Sizes:
    """The largest evaluation that fits ``seconds``: held-out and probe documents scaled down together from
    the ideal plan, the probes dropped before the held-out documents go below what fits; the floors when
    nothing fits."""
    top = max(ideal.heldout_docs, floors.heldout_docs)
    for docs in range(top, floors.heldout_docs - 1, -1):
        scaled_probes = math.floor(ideal.probe_docs * docs / top)
        for probes in (max(floors.probe_docs, min(ideal.probe_docs, scaled_probes)), floors.probe_docs):
            sizes = Sizes(ideal.steps, docs, probes, ideal.curve_points)
            if evaluation_seconds(sizes, costs, slowdown) <= seconds:
                return sizes
    return Sizes(ideal.steps, floors.heldout_docs, floors.probe_docs, ideal.curve_points)


@dataclass
class Budget:
    """The budget as the run goes: ``seconds`` from ``start`` (a clock reading), the ``ideal`` sizes of an
    idle machine, ``costs`` per unit, and ``guess``, the slowdown assumed until a phase has been measured.

    ``record`` adds a finished phase (its predicted idle seconds and its measured wall seconds); ``slowdown``
    is their ratio. ``cuts`` lists, in words, every size the plan reduced."""

    seconds: float
    start: float
    ideal: Sizes
    costs: UnitCosts
    guess: float = 1.0
    floors: Floors = field(default_factory=Floors)
    predicted: float = 0.0
    measured: float = 0.0
    cuts: list[str] = field(default_factory=list)

    def remaining(self, now: float) -> float:
        return max(0.0, self.seconds - (now - self.start))

    @property
    def slowdown(self) -> float:
        """Measured over predicted wall time of the phases recorded so far (``guess`` before any), at least
        1/2 so that one quick phase cannot let the rest overrun."""
        return max(0.5, self.measured / self.predicted if self.predicted > 0 else self.guess)

    def record(self, predicted_idle: float, wall: float) -> None:
        self.predicted += predicted_idle
        self.measured += wall

    def plan_steps(self, now: float) -> int:
        """Fine-tuning steps of each run, for the time left at ``now``."""
        steps = fit_steps(self.remaining(now), self.ideal, self.costs, self.slowdown, self.floors)
        if steps < self.ideal.steps:
            self.cuts.append(f"fine-tuning steps {self.ideal.steps} -> {steps}")
        return steps

    def plan_evaluation(self, now: float, steps: int, curve_points: int) -> Sizes:
        """Evaluation sizes for the time left at ``now``, after ``steps`` steps of each run with
        ``curve_points`` saved checkpoints to probe."""
        ideal = Sizes(steps, self.ideal.heldout_docs, self.ideal.probe_docs, curve_points)
        sizes = fit_evaluation(self.remaining(now), ideal, self.costs, self.slowdown, self.floors)
        if sizes.heldout_docs < ideal.heldout_docs:
            self.cuts.append(f"held-out documents {ideal.heldout_docs} -> {sizes.heldout_docs}")
        if sizes.probe_docs < ideal.probe_docs:
            after = "no held-out curves" if sizes.probe_docs == 0 else f"{sizes.probe_docs} per curve point"
            self.cuts.append(f"probe documents {ideal.probe_docs} per curve point -> {after}")
        return sizes

    def pretrain_time_up(
        self, plan: Plan, clock: Callable[[], float] = time.perf_counter
    ) -> Callable[[int, float], bool]:
        """For ``train(time_up=...)``: whether pretraining should stop after ``step`` steps in ``seconds``.
        Those steps measure the slowdown (their wall time over their idle cost), which sizes ``plan``'s cap;
        the cap is counted on ``clock`` from the budget's start, so the set-up before the first step counts."""

        def time_up(step: int, seconds: float) -> bool:
            slowdown = seconds / (step * PRETRAIN_STEP_SECONDS)
            return clock() - self.start >= plan.pretrain_cap(slowdown)

        return time_up

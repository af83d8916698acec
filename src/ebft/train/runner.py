"""The contract between the training loop and a mode (docs/design.md §3.1): what a mode gives the loop, and
what it may assume.

The loop (``ebft.train.loop``) owns accelerate, the optimizer and schedule, gradient reduction and clipping,
logging, checkpoints and signals; it knows no mode. A mode is a ``Mode``: how it loads its data, whether it
needs the frozen feature network, and the factory that builds its ``Runner`` from the loop's ``Parts``. The
runner does everything in between: one optimizer step's rollouts, scoring and micro-batch backward passes,
its typed statistics, and any state of its own that a checkpoint must carry.

Exactness across layouts, which every runner must keep: the rows of a step and each row's randomness
depend only on the seed, the step (or rollout batch) and the row's place in the global batch, never on
how the step is split into micro-batches or processes; every loss is divided by step-global counts. The
loop sums gradients over processes, so 1 x 8 == 8 x 1 == 2 processes x 4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import torch

from ebft.config import TrainConfig
from ebft.modeling.feature_network import FeatureNetwork
from ebft.train.checkpoint import TrainState
from ebft.train.distributed import Sharding
from ebft.train.stats import StepStats

S = TypeVar("S", bound=StepStats)


@dataclass
class StepOutput(Generic[S]):
    """What ``Runner.run`` hands back: this process's statistics of the step (not yet reduced across
    processes) and JSON-ready records for the mode's records file (empty when it keeps none)."""

    stats: S
    records: list[dict[str, Any]] = field(default_factory=list)


class Preview(NamedTuple):
    """One sample as a live view shows it: what it is (e.g. ``sample 3``), its reward, its text."""

    label: str
    reward: float
    text: str


@dataclass(frozen=True)
class Parts:
    """What the loop builds before a mode's runner, in this order: the data (``Mode.load_data``), the policy,
    the frozen feature network (before any checkpoint loads, so that for full fine-tuning it is a copy of the
    *base* weights also on resume, and before FSDP shards the policy, since sharded modules cannot be
    copied; None for a mode that needs none), then the policy's sharding."""

    cfg: TrainConfig
    model: torch.nn.Module
    features: FeatureNetwork | None
    tokenizer: Any
    data: Any
    accelerator: Any
    autocast_dtype: torch.dtype | None
    sharding: Sharding


class Runner(Protocol[S]):
    """One mode inside the training loop. The loop calls, in order: ``total_steps``; on resume ``load``;
    ``start``; per step ``run``, then (after the update) ``after_update``, then ``metrics`` when the step is
    logged and ``save`` when it is checkpointed; ``close`` at the end, also after an error."""

    label: str
    """The progress bar's description."""
    progress_metric: tuple[str, str]
    """(word, logged metric name) shown after the progress bar, e.g. ``("reward", "ebft/reward")``."""
    reward_line: bool
    """Whether the console shows the reward line before each logged step's line."""
    log_name: str | None
    """The records file in output_dir (truncated to the resumed step on resume); None: the mode has none."""
    keep_records: bool
    """Whether ``run`` returns records (the loop gathers them from every process and appends them)."""
    record_order: str
    """The record key that orders gathered records (their place in the global batch)."""
    stats_type: type[S]
    """The class of ``StepOutput.stats``, to restore a checkpoint's window."""

    def total_steps(self) -> int:
        """Optimizer steps of the run (``max_steps``, or the epochs of the loaded data at this world size)."""
        ...

    def start(self, state: TrainState) -> None:
        """Get ready to run step ``state.step + 1``: position the row stream at ``state.data_position`` (and,
        for a rollout server, give it the current policy). Called once, after any resume."""
        ...

    def run(self, step: int, state: TrainState) -> StepOutput[S]:
        """Optimizer step ``step`` on this process: its ``gradient_accumulation_steps`` micro-batches of
        ``micro_batch_size``, rollouts and scoring included. May assume the gradients are zero (None) on
        entry and that every process calls it; must leave each micro-batch's gradient summed into ``.grad``
        (not reduced across processes: the loop or FSDP does that), with every loss divided by step-global
        counts, and advance ``state.data_position`` past the rows it consumed."""
        ...

    def after_update(self, step: int) -> None:
        """After the optimizer applied (or skipped) step ``step``: e.g. send the new policy to a rollout
        server. May raise ``PolicySyncError``: the loop then saves the step and stops."""
        ...

    def metrics(self, stats: S, steps: int, seconds: float) -> dict[str, float]:
        """The logged metrics of ``stats`` summed over ``steps`` applied steps that took ``seconds`` (the
        loop adds its own: grad_norm, learning_rate, step_seconds, peak_memory_mib, ebft/skipped_steps)."""
        ...

    def show_records(self, console: Any, records: list[dict[str, Any]]) -> None:
        """Print a step's gathered records (main process; ``console`` None: nowhere to print)."""
        ...

    def previews(self, records: list[dict[str, Any]]) -> list[Preview]:
        """A step's gathered records as a few samples for a live view (``ebft train --tui``; main process)."""
        ...

    def save(self, directory: Path, rank: int) -> None:
        """Write this process's mode state into a checkpoint being written (every process calls it)."""
        ...

    def load(self, directory: Path, rank: int) -> None:
        """Read what ``save`` wrote, before ``start``."""
        ...

    def close(self) -> None:
        """Release threads, servers and connections."""
        ...


RunnerFactory = Callable[[Parts], "Runner[Any]"]


class Evaluator(Protocol):
    """A mode's held-out scoring for evaluation during training (docs/design.md §8), over the loop's ``Parts``
    and the held-out rows. The loop calls ``score`` on every process with that process's share of the evaluated
    rows, with the policy in eval mode, without gradient, under FSDP on gathered weights and with the training
    random state saved and restored; it adds the processes' sums and calls ``summarise`` on the total.

    Exactness: a row's sums depend only on the row, its place among the evaluated rows and the weights, never on
    how the rows are split into batches or processes; every call scores a row with the same seeds, so two
    evaluations differ only by the weights."""

    def __len__(self) -> int:
        """How many held-out rows there are."""
        ...

    def score(self, indices: list[int], first: int, bar: Any) -> dict[str, float]:
        """Sums over held-out rows ``indices``, the evaluated rows from place ``first`` on; the same keys on
        every process and call. ``bar.advance(n)`` after each n rows."""
        ...

    def summarise(self, sums: dict[str, float]) -> dict[str, float | None]:
        """The metrics of summed rows, without the ``eval/`` prefix (None: nothing was counted)."""
        ...


EvaluatorFactory = Callable[[Parts, Any], Evaluator]


@dataclass(frozen=True)
class Mode:
    """A mode as the loop builds it: ``load_data(cfg, tokenizer, search_dir=...)`` (its rows, an object with
    ``train`` and ``val``, the rows held out by ``val_set_size`` or None; ``search_dir``: where custom transform
    modules are found), whether its runner reads a frozen feature network, ``build(parts)``, the factory of its
    runner, ``evaluator(parts, held_out_rows)``, the factory of its evaluation during training (None: the mode
    offers none, and a config that asks for it is refused), and ``workload(cfg, shape)``, the token counts of its
    phases that the memory plan prices (None: no plan is logged)."""

    load_data: Callable[..., Any]
    build: RunnerFactory
    needs_features: bool = True
    workload: Callable[..., Any] | None = None
    evaluator: EvaluatorFactory | None = None

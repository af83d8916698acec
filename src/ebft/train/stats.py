"""Typed step statistics: what a step measured, added over micro-batches, processes and logged steps.

Each mode declares one dataclass of floats (``StridedStats``, ``StructuredStats``, ``SftStats``) whose
fields are sums, except the fields declared with ``minimum()``, which keep the smallest value seen. The
base class gives every such dataclass its arithmetic: ``+`` (sum, or min), ``reduced`` across processes
(one collective for all sums, one for all minima), ``finite`` and the conversion to and from the dict
saved in a checkpoint. A mode maps its fields to the logged metric names in its own ``metrics``, so a
metric the loop logs is read from a declared field, never from a string key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from ebft.train.batches import reduce_min, reduce_sum

if TYPE_CHECKING:
    from accelerate import Accelerator
    from typing_extensions import Self

_REDUCE = "reduce"
_MIN = "min"


def minimum() -> Any:
    """A statistic that keeps its smallest value (``inf`` until one is seen) instead of a sum."""
    return field(default=math.inf, metadata={_REDUCE: _MIN})


def _is_minimum(f: Field[Any]) -> bool:
    return f.metadata.get(_REDUCE) == _MIN


@dataclass
class StepStats:
    """Base of every mode's statistics: subclasses are dataclasses whose fields are floats, default 0."""

    def __add__(self, other: Self) -> Self:
        if type(other) is not type(self):
            raise TypeError(f"cannot add {type(other).__name__} to {type(self).__name__}")
        values = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            values[f.name] = min(a, b) if _is_minimum(f) else a + b
        return type(self)(**values)

    def reduced(self, accelerator: Accelerator) -> Self:
        """Summed (minima: minimised) over all processes; every process must call it (two collectives at
        most, in float64)."""
        device = accelerator.device
        sums = [f.name for f in fields(self) if not _is_minimum(f)]
        mins = [f.name for f in fields(self) if _is_minimum(f)]
        values: dict[str, float] = {}
        for names, reduce in ((sums, reduce_sum), (mins, reduce_min)):
            if names:
                local = torch.tensor([getattr(self, n) for n in names], dtype=torch.float64, device=device)
                values.update(zip(names, reduce(accelerator, local).tolist(), strict=True))
        return type(self)(**values)

    def finite(self) -> bool:
        """Whether every sum is finite (a minimum is ``inf`` while nothing was seen, so it is not checked)."""
        return all(math.isfinite(getattr(self, f.name)) for f in fields(self) if not _is_minimum(f))

    def saved(self) -> dict[str, float]:
        """The fields by name, for a checkpoint's JSON."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def restored(cls, saved: Mapping[str, float]) -> Self:
        """The statistics ``saved`` wrote; other keys in ``saved`` are ignored, a missing field keeps its default."""
        return cls(**{f.name: float(saved[f.name]) for f in fields(cls) if f.name in saved})


@dataclass
class LoopStats(StepStats):
    """What the loop itself measures each applied step: the gradient norm before clipping, and the step's
    wall-clock seconds (rollouts, backward passes, reductions, the update)."""

    grad_norm: float = 0.0
    seconds: float = 0.0

    def metrics(self, steps: int, learning_rate: float, peak_memory_bytes: int) -> dict[str, float]:
        """Means over ``steps`` applied steps, the learning rate of the last one and the peak memory so far."""
        return {
            "grad_norm": self.grad_norm / steps,
            "learning_rate": learning_rate,
            "step_seconds": self.seconds / steps,
            "peak_memory_mib": peak_memory_bytes / 2**20,
        }


@dataclass
class Window:
    """The statistics of the applied steps since the last logged step (saved in checkpoints, so a resumed run
    logs the same means). ``stats`` is None until the first step is added."""

    stats: StepStats | None = None
    loop: LoopStats = field(default_factory=LoopStats)
    steps: int = 0

    def add(self, stats: StepStats, loop: LoopStats) -> None:
        self.stats = stats if self.stats is None else self.stats + stats
        self.loop = self.loop + loop
        self.steps += 1

    def saved(self) -> dict[str, Any]:
        """The checkpoint's ``window``: every field by name in one dict of sums, and the step count."""
        sums = {} if self.stats is None else {**self.stats.saved(), **self.loop.saved()}
        return {"sums": sums, "steps": self.steps}

    @classmethod
    def restored(cls, saved: Mapping[str, Any], stats_type: type[StepStats]) -> Window:
        """The window ``saved`` wrote (``{}``: an empty one). Checkpoints written before the statistics were
        typed hold the same names in ``sums``, so they restore the same way."""
        steps = int(saved.get("steps", 0))
        if not steps:
            return cls()
        sums = saved["sums"]
        return cls(stats=stats_type.restored(sums), loop=LoopStats.restored(sums), steps=steps)

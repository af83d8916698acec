"""What an evaluation returns (:class:`EvalResult`), and what one mode's evaluation loop hands back to
``run.evaluate`` (:class:`ModeRun`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalResult:
    """metrics: the table's values (None where nothing was counted); documents: one dict per document
    (strided) or prompt row (structured): its ``index`` in the held-out set, sizes and the same metrics;
    info: what was evaluated on what, with which settings."""

    metrics: dict[str, float | None]
    documents: list[dict]
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"metrics": self.metrics, **self.info, "documents": self.documents}


@dataclass
class ModeRun:
    """What one mode's evaluation loop measured; ``evaluate`` adds the model, source and timing. ``sums``: the
    per-row sums ``metrics`` summarises (fixed keys, so that several processes' sums add up)."""

    metrics: dict[str, float | None]
    documents: list[dict]
    data: dict
    settings: dict
    sums: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    execution: dict | None = None

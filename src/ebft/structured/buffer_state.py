"""A reused rollout batch in a checkpoint, as plain data: tensors, numbers, strings, lists and dicts only,
so that it loads with ``torch.load(weights_only=True)`` (docs/guide.md, "Security")."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ebft.data.structured import PromptRow
from ebft.structured.rollout import Sample
from ebft.structured.scoring import Scores
from ebft.structured.step import RolloutBuffer
from ebft.train.checkpoint_files import load_torch, problem, save_torch


def buffer_file(rank: int) -> str:
    return f"rollout_buffer_{rank}.pt"


def plain(buffer: RolloutBuffer) -> dict:
    """``buffer`` as nested dicts and lists (the rows, samples and scores as their fields)."""
    return {
        "rows": [asdict(row) for row in buffer.rows],
        "samples": [asdict(sample) for sample in buffer.samples],
        "scores": asdict(buffer.scores),
        "advantage": buffer.advantage,
        "generation": buffer.generation,
        "old_logprobs": buffer.old_logprobs,
    }


def _row(d: dict) -> PromptRow:
    return PromptRow(
        prompt=d["prompt"],
        ground_truth=str(d["ground_truth"]),
        remaining_turns=tuple(d["remaining_turns"]),
        prompt_ids=tuple(int(i) for i in d["prompt_ids"]),
        gt_ids=tuple(int(i) for i in d["gt_ids"]),
        source=str(d["source"]),
        tests=tuple(str(t) for t in d["tests"]),
    )


def _sample(d: dict) -> Sample:
    turns = tuple((tuple(int(i) for i in ctx), tuple(int(i) for i in reply)) for ctx, reply in d["turns"])
    return Sample(**{**d, "turns": turns})


def from_plain(data: dict) -> RolloutBuffer:
    """The inverse of ``plain``; KeyError, TypeError or ValueError on anything else."""
    scores = data["scores"]
    if not all(isinstance(v, torch.Tensor) for v in [*scores.values(), data["advantage"]]):
        raise TypeError("scores and advantages must be tensors")
    return RolloutBuffer(
        rows=[_row(r) for r in data["rows"]],
        samples=[_sample(s) for s in data["samples"]],
        scores=Scores(**scores),
        advantage=data["advantage"],
        generation=int(data["generation"]),
        old_logprobs=data["old_logprobs"],
    )


def save(buffer: RolloutBuffer, directory: Path, rank: int) -> None:
    save_torch(plain(buffer), Path(directory) / buffer_file(rank))


def load(directory: Path, rank: int) -> RolloutBuffer | None:
    """The buffer saved by process ``rank`` in checkpoint ``directory``; None when it saved none."""
    name = buffer_file(rank)
    if not (Path(directory) / name).exists():
        return None
    try:
        return from_plain(load_torch(directory, name))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise problem(directory, name, f"not a rollout batch written by ebft ({exc})") from None

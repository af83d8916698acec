"""Small pieces shared by the training loop (``ebft.train.loop``) and the per-mode runners."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class StepOutput:
    """What a runner's step hands back to the loop (its gradients are already in ``.grad``).

    sums: quantities summed over this process's micro-batches; keys ending in ``_min`` are minima.
    Every process must return the same keys. records: JSON-ready rows for the mode's log file.
    """

    sums: dict[str, float]
    records: list[dict] = field(default_factory=list)


def global_micro_batches(num_rows: int, size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Row indices of each global batch of ``size`` rows, from batch ``start`` on.

    The rows form one stream, a fresh permutation (seeded by seed + epoch) per pass over the data, cut
    into fixed-size pieces; a piece may straddle two epochs. Deterministic, so a resumed run continues
    with exactly the rows the uninterrupted run would have seen.
    """
    epoch, offset, order = -1, 0, []
    position = 0
    while True:
        while len(order) - offset < size:
            epoch += 1
            gen = torch.Generator().manual_seed(seed + epoch)
            order = order[offset:] + torch.randperm(num_rows, generator=gen).tolist()
            offset = 0
        piece, offset = order[offset : offset + size], offset + size
        if position >= start:
            yield piece
        position += 1


def reduce_sum(accelerator, values: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(values, reduction="sum") if accelerator.num_processes > 1 else values


def reduce_min(accelerator, values: torch.Tensor) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return values
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values


def reduce_step_sums(accelerator, sums: dict[str, float]) -> dict[str, float]:
    """Sum (or, for ``_min`` keys, minimise) a step's sums over processes."""
    keys = sorted(sums)
    mins = [k for k in keys if k.endswith("_min")]
    adds = [k for k in keys if not k.endswith("_min")]
    device = accelerator.device
    added = reduce_sum(accelerator, torch.tensor([sums[k] for k in adds], dtype=torch.float64, device=device))
    out = dict(zip(adds, added.tolist(), strict=True))
    if mins:
        low = reduce_min(accelerator, torch.tensor([sums[k] for k in mins], dtype=torch.float64, device=device))
        out.update(zip(mins, low.tolist(), strict=True))
    return out

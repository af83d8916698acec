"""Which rows each step takes, and the reductions across processes that the loop and the runners share."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch

from ebft.config import TrainConfig
from ebft.data.collate import DocumentBatch, collate_documents
from ebft.errors import EbftError


def global_micro_batches(num_rows: int, size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Row indices of each global batch of ``size`` rows, from batch ``start`` on.

    The rows form one stream, a fresh permutation (seeded by seed + epoch) per pass over the data, cut
    into fixed-size pieces; a piece may straddle two epochs. Deterministic, so a resumed run continues
    with exactly the rows the uninterrupted run would have seen.
    """
    epoch, offset = -1, 0
    order: list[int] = []
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


def document_steps(cfg: TrainConfig, num_rows: int, world: int) -> int:
    """Optimizer steps of a run over document rows: ``max_steps``, else ``num_epochs`` passes over ``num_rows``
    rows at ``micro_batch_size x gradient_accumulation_steps`` rows per process and step (at least one)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    rows_per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * world
    return max(1, math.ceil(cfg.num_epochs * num_rows / rows_per_step))


def local_documents(
    pieces: list[list[int]], rows: Sequence[Mapping], rank: int, size: int, pad_id: int, device
) -> list[DocumentBatch]:
    """This process's share of each global micro-batch in ``pieces``: rows ``rank * size`` to
    ``(rank + 1) * size`` of it, collated and moved to ``device``."""
    return [
        collate_documents([rows[i] for i in piece[rank * size : (rank + 1) * size]], pad_id).to(device)
        for piece in pieces
    ]


def reduce_sum(accelerator, values: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(values, reduction="sum") if accelerator.num_processes > 1 else values


def reduce_min(accelerator, values: torch.Tensor) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return values
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values


def spread_indices(total: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over ``range(total)`` (all of them when limit is None or >= total).

    Packed chunks follow the source files in order, so the first N chunks would cover only the first
    few files; an even spread covers the whole held-out set.
    """
    if limit is None or limit >= total:
        return list(range(total))
    if limit < 1:
        raise EbftError(f"--max-docs must be >= 1, got {limit}")
    return [(i * total) // limit for i in range(limit)]

"""SFT inside the training loop: the strided mode's rows, in the same order, trained with cross-entropy.

It reads a ``TrainConfig`` exactly as the EBFT modes do and takes the same rows in the same order
(``global_micro_batches``), with the same optimizer, schedule, accumulation and clipping, so two runs from
one config differ only in their objective. The ``ebft:`` RL keys are not used, except that the strided
layout keys decide which rows are usable (as in strided training). Not an ``ebft.mode`` value: the
quickstart passes ``mode()`` to the loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

from ebft.data.load import load_strided_datasets
from ebft.sft.step import SftStats, ce_microbatch, target_count
from ebft.train.batches import document_steps, global_micro_batches, local_documents, reduce_sum
from ebft.train.checkpoint import TrainState
from ebft.train.runner import Mode, Parts, Preview, StepOutput


class SftRunner:
    """One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``micro_batch_size`` documents per
    process; ``data_position`` counts global micro-batches consumed (as in strided mode)."""

    progress_metric = ("ce", "ce_loss")
    reward_line = False
    log_name: str | None = None
    keep_records = False
    record_order = "document"
    stats_type = SftStats

    def __init__(self, parts: Parts, label: str = "sft"):
        self.label = label
        self.cfg, self.model, self.sharding = parts.cfg, parts.model, parts.sharding
        self.rows, self.accelerator, self.amp = parts.data.train, parts.accelerator, parts.autocast_dtype
        self.pad_id = parts.tokenizer.pad_token_id
        self.batches: Iterator[list[int]] | None = None  # set by start

    def total_steps(self) -> int:
        return document_steps(self.cfg, len(self.rows), self.accelerator.num_processes)

    def start(self, state: TrainState) -> None:
        size = self.cfg.micro_batch_size * self.accelerator.num_processes
        self.batches = global_micro_batches(len(self.rows), size, self.cfg.seed, start=state.data_position)

    def run(self, step: int, state: TrainState) -> StepOutput[SftStats]:
        if self.batches is None:
            raise RuntimeError("SftRunner.run before start: the loop calls start first")
        mb, gas, acc = self.cfg.micro_batch_size, self.cfg.gradient_accumulation_steps, self.accelerator
        batches = self.batches
        pieces = [next(batches) for _ in range(gas)]
        local = local_documents(pieces, self.rows, acc.process_index, mb, self.pad_id, acc.device)
        counted = torch.tensor([sum(target_count(b) for b in local)], dtype=torch.float64, device=acc.device)
        step_targets = int(reduce_sum(acc, counted)[0])
        stats = SftStats()
        for batch in local:
            stats += ce_microbatch(self.sharding, batch, step_targets, self.amp)
        state.data_position += gas
        return StepOutput(stats=stats)

    def metrics(self, stats: SftStats, steps: int, seconds: float) -> dict[str, float]:
        """See ``SftStats.metrics``."""
        return stats.metrics(seconds)

    def show_records(self, console, records: list[dict]) -> None:
        """SFT keeps no records."""

    def previews(self, records: list[dict]) -> list[Preview]:
        """SFT keeps no records."""
        return []

    def after_update(self, step: int) -> None:
        """Nothing to sync."""

    def save(self, directory: Path, rank: int) -> None:
        """No state beyond the loop's: the data position says where the stream continues."""

    def load(self, directory: Path, rank: int) -> None:
        """See ``save``."""

    def close(self) -> None:
        """Nothing to release."""


def build(parts: Parts, label: str = "sft") -> SftRunner:
    """The SFT runner over the loop's parts (it needs no feature network); ``label``: its progress bar's name."""
    return SftRunner(parts, label)


def mode(label: str = "sft") -> Mode:
    """SFT as a mode of the loop, its progress bar named ``label`` (the quickstart's "sft" and "pretrain")."""
    return Mode(load_data=load_strided_datasets, build=partial(build, label=label), needs_features=False)

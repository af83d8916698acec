"""Strided mode inside the training loop: which documents each step takes, and its metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ebft.config import TrainConfig
from ebft.data.cache import load_strided
from ebft.evaluate.run import held_out_evaluator
from ebft.modeling.memory_plan import ModelShape, Workload, strided_workload
from ebft.strided.stats import StridedStats
from ebft.strided.step import StepTotals, StridedSettings, count_targets, document_generators, strided_microbatch
from ebft.train.batches import document_steps, global_micro_batches, local_documents, reduce_sum
from ebft.train.checkpoint import TrainState
from ebft.train.distributed import Sharding
from ebft.train.runner import Mode, Parts, Preview, StepOutput


class StridedRunner:
    """One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``micro_batch_size``
    documents per process, each rolled out with the current weights (on-policy).

    ``data_position`` counts global micro-batches consumed.
    """

    label = "ebft strided"
    progress_metric = ("reward", "ebft/mean_reward")
    reward_line = False
    log_name: str | None = "rollouts.jsonl"
    record_order = "document"
    stats_type = StridedStats

    def __init__(
        self, cfg: TrainConfig, *, model, features, tokenizer, data, accelerator, autocast_dtype, sharding=None
    ):
        self.cfg, self.model, self.features = cfg, model, features
        self.sharding = sharding or Sharding(model)
        self.data, self.accelerator, self.amp = data, accelerator, autocast_dtype
        self.settings = StridedSettings.from_config(cfg.ebft)
        self.pad_id, self.decode = tokenizer.pad_token_id, tokenizer.decode
        self.keep_records = cfg.ebft.log_rollouts
        self.batches: Iterator[list[int]] | None = None

    def total_steps(self) -> int:
        return document_steps(self.cfg, len(self.data.train), self.accelerator.num_processes)

    def start(self, state: TrainState) -> None:
        mb, world = self.cfg.micro_batch_size, self.accelerator.num_processes
        self.batches = global_micro_batches(len(self.data.train), mb * world, self.cfg.seed, start=state.data_position)

    def run(self, step: int, state: TrainState) -> StepOutput[StridedStats]:
        cfg, s, acc = self.cfg, self.settings, self.accelerator
        mb, gas = cfg.micro_batch_size, cfg.gradient_accumulation_steps
        world, rank, device = acc.num_processes, acc.process_index, acc.device
        if self.batches is None:
            raise RuntimeError("StridedMode.run before start(): the loop starts a mode before its first step")
        batches = self.batches
        pieces = [next(batches) for _ in range(gas)]
        local = local_documents(pieces, self.data.train, rank, mb, self.pad_id, device)
        counts = torch.tensor(
            [[c.rl_tokens, c.ce_tokens] for c in (count_targets(b, s) for b in local)], dtype=torch.float64
        ).sum(0)
        counts = reduce_sum(acc, counts.to(device))
        totals = StepTotals(int(counts[0]), int(counts[1]))
        stats = StridedStats()
        records: list[dict] = []
        for index, batch in enumerate(local):
            first_doc = index * mb * world + rank * mb  # the document's place in the global step
            result = strided_microbatch(
                self.model,
                self.features,
                batch,
                s,
                totals,
                autocast_dtype=self.amp,
                generators=document_generators(cfg.seed, step, first_doc, batch.input_ids.shape[0], device),
                keep_rollouts=self.keep_records,
                sharding=self.sharding,
            )
            stats += result.stats
            records.extend({"document": first_doc + d, **r} for d, r in enumerate(result.rollouts))
        state.data_position += gas
        return StepOutput(stats=stats, records=records)

    def metrics(self, stats: StridedStats, steps: int, seconds: float) -> dict[str, float]:
        """The seeds' strided metric names (see ``StridedStats.metrics``)."""
        return stats.metrics(self.settings.rl_coef, self.settings.ce_coef, seconds)

    def show_records(self, console, records: list[dict]) -> None:
        """Rollouts go to the records file only (token ids, not worth a console line)."""

    def previews(self, records: list[dict]) -> list[Preview]:
        """Each document's first block: its n samples, decoded, with their rewards."""
        out = []
        for record in records:
            anchor = record["anchors"][0] if record["anchors"] else 0
            for i, blocks in enumerate(record["samples"]):
                if blocks:
                    label = f"document {record['document']} @{anchor} sample {i}"
                    out.append(Preview(label, blocks[0]["reward"], self.decode(blocks[0]["tokens"])))
        return out

    def after_update(self, step: int) -> None:
        """Nothing to sync: rollouts use the training weights."""

    def save(self, directory: Path, rank: int) -> None:
        """No state beyond the trainer's: the data position says where the stream continues."""

    def load(self, directory: Path, rank: int) -> None:
        """See ``save``."""

    def close(self) -> None:
        """Nothing to release."""


def build(parts: Parts) -> StridedRunner:
    """The strided runner over the loop's parts (it reads the frozen feature network)."""
    return StridedRunner(
        parts.cfg,
        model=parts.model,
        features=parts.features,
        tokenizer=parts.tokenizer,
        data=parts.data,
        accelerator=parts.accelerator,
        autocast_dtype=parts.autocast_dtype,
        sharding=parts.sharding,
    )


def workload(cfg: TrainConfig, shape: ModelShape) -> Workload:
    """The memory plan's token counts of a strided step on one process (full-length documents)."""
    e = cfg.ebft
    return strided_workload(
        sequence_len=cfg.sequence_len,
        stride=e.stride,
        first_anchor=e.context_length,
        gen_len=e.generate_max_len,
        samples=e.n_samples_per_prompt,
        docs=cfg.micro_batch_size,
        ce=e.ce_coef > 0,
    )


MODE = Mode(load_data=load_strided, build=build, workload=workload, evaluator=held_out_evaluator)

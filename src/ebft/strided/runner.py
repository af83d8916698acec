"""Strided mode inside the training loop: which documents each step takes, and its metrics."""

from __future__ import annotations

import math

import torch

from ebft.data.collate import collate_documents
from ebft.strided.step import StepTotals, StridedSettings, count_targets, document_generators, strided_microbatch
from ebft.train.batches import StepOutput, global_micro_batches, reduce_sum
from ebft.train.distributed import Sharding


class StridedRunner:
    """One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``micro_batch_size``
    documents per process, each rolled out with the current weights (on-policy).

    ``data_position`` counts global micro-batches consumed.
    """

    label = "ebft strided"
    reward_key = "ebft/mean_reward"
    log_name = "rollouts.jsonl"

    def __init__(self, cfg, *, model, features, tokenizer, data, accelerator, autocast_dtype, sharding=None):
        self.cfg, self.model, self.features = cfg, model, features
        self.sharding = sharding or Sharding(model)
        self.data, self.accelerator, self.amp = data, accelerator, autocast_dtype
        self.settings = StridedSettings.from_config(cfg.ebft)
        self.pad_id = tokenizer.pad_token_id
        self.keep_records = cfg.ebft.log_rollouts
        self.batches = None

    def total_steps(self) -> int:
        cfg = self.cfg
        if cfg.max_steps is not None:
            return cfg.max_steps
        docs_per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * self.accelerator.num_processes
        return max(1, math.ceil(cfg.num_epochs * len(self.data.train) / docs_per_step))

    def start(self, state) -> None:
        mb, world = self.cfg.micro_batch_size, self.accelerator.num_processes
        self.batches = global_micro_batches(len(self.data.train), mb * world, self.cfg.seed, start=state.data_position)

    def run(self, step: int, state) -> StepOutput:
        cfg, s, acc = self.cfg, self.settings, self.accelerator
        mb, gas = cfg.micro_batch_size, cfg.gradient_accumulation_steps
        world, rank, device = acc.num_processes, acc.process_index, acc.device
        pieces = [next(self.batches) for _ in range(gas)]
        local = [
            collate_documents([self.data.train[i] for i in piece[rank * mb : (rank + 1) * mb]], self.pad_id).to(device)
            for piece in pieces
        ]
        counts = torch.tensor(
            [[c.rl_tokens, c.ce_tokens] for c in (count_targets(b, s) for b in local)], dtype=torch.float64
        ).sum(0)
        counts = reduce_sum(acc, counts.to(device))
        totals = StepTotals(int(counts[0]), int(counts[1]))
        sums: dict[str, float] = {}
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
            for key, value in result.sums.items():
                sums[key] = sums.get(key, 0.0) + value
            sums["loss"] = sums.get("loss", 0.0) + result.loss
            records.extend({"document": first_doc + d, **r} for d, r in enumerate(result.rollouts))
        state.data_position += gas
        return StepOutput(sums=sums, records=records)

    def metrics(self, sums: dict[str, float], steps: int) -> dict[str, float]:
        """Quantities summed over ``steps`` logged steps -> the logged means (the seeds' strided names).

        Every mean here is a ratio of two sums, so ``steps`` is not needed."""
        s = self.settings
        samples = max(sums["samples"], 1.0)
        adv_mean = sums["advantage"] / samples
        rl_loss = sums["rl_sum"] / max(sums["rl_tokens"], 1.0)
        out = {
            "ebft/alignment": sums["alignment"] / samples,
            "ebft/diversity": sums["diversity"] / samples,
            "ebft/mean_reward": sums["reward"] / samples,
            "ebft/cfm_loss": sums["cfm"] / max(sums["blocks"], 1.0),
            "ebft/rl_loss": rl_loss,
            "ebft/advantages_std": math.sqrt(max(sums["advantage_sq"] / samples - adv_mean**2, 0.0)),
            "ebft/num_blocks": sums["blocks"] / max(sums["docs"], 1.0),
        }
        loss = s.rl_coef * rl_loss
        if s.ce_coef > 0:
            out["ebft/ce_loss"] = sums["ce_sum"] / max(sums["ce_tokens"], 1.0)
            loss += s.ce_coef * out["ebft/ce_loss"]
        out["loss"] = loss
        out["tokens_per_second"] = (sums["doc_tokens"] + sums["rl_tokens"]) / max(sums["seconds"], 1e-9)
        return out

    def after_update(self, step: int) -> None:
        """Nothing to sync: rollouts use the training weights."""

    def save(self, directory, rank: int) -> None:
        """No state beyond the trainer's: the data position says where the stream continues."""

    def load(self, directory, rank: int) -> None:
        """See ``save``."""

    def close(self) -> None:
        """Nothing to release."""

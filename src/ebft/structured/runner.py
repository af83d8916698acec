"""Structured mode inside the training loop: rollout batches, their reuse, prefetch, and metrics.

Sizes (TRL's convention): ``micro_batch_size`` counts completions, so a process trains on
``micro_batch_size * gradient_accumulation_steps`` completions per optimizer step, i.e. that divided by
``num_generations`` prompts. One rollout batch serves ``num_iterations`` consecutive optimizer steps
(the later ones are off-policy and use the clipped surrogate against the stored log-probs).
``data_position`` counts rollout batches taken from the prompt stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ebft.attention.support import log_structured_passes
from ebft.config import TrainConfig
from ebft.data.cache import load_structured
from ebft.evaluate.run import held_out_evaluator
from ebft.losses import LossNorm
from ebft.modeling.memory_plan import ModelShape, Workload, structured_workload
from ebft.structured import buffer_state
from ebft.structured.hf import HFGenerate
from ebft.structured.rollout import Sample, Sampling, loss_token_count, mix_seed
from ebft.structured.scoring import FEATURE_BATCH, score
from ebft.structured.settings import StructuredSettings
from ebft.structured.stats import StructuredStats
from ebft.structured.step import RolloutBuffer, microbatch, old_logprobs, roll_out
from ebft.train.batches import global_micro_batches, reduce_sum
from ebft.train.distributed import Sharding
from ebft.train.runner import Mode, Parts, Preview, StepOutput
from ebft.vllm.backend import vllm_backend


class StructuredRunner:
    """One rollout batch serves ``num_iterations`` optimizer steps; each step trains on it in
    ``gradient_accumulation_steps`` micro-batches of ``micro_batch_size`` completions per process."""

    label = "ebft structured"
    progress_metric = ("reward", "ebft/reward")
    reward_line = True
    log_name: str | None = "completions.jsonl"
    record_order = "sample"
    stats_type = StructuredStats

    def __init__(
        self, cfg: TrainConfig, *, model, features, tokenizer, data, accelerator, autocast_dtype, backend, sharding=None
    ) -> None:
        self.cfg, self.model, self.features, self.tokenizer = cfg, model, features, tokenizer
        self.sharding = sharding or Sharding(model)
        self.data, self.accelerator, self.amp, self.backend = data, accelerator, autocast_dtype, backend
        self.s = StructuredSettings.from_config(cfg, tokenizer.eos_token_id)
        log_structured_passes(model.config)
        self.pad_id = tokenizer.pad_token_id
        self.keep_records = cfg.trl.log_completions
        self.local_prompts = cfg.micro_batch_size * cfg.gradient_accumulation_steps // self.s.num_generations
        self.global_prompts = self.local_prompts * accelerator.num_processes
        self.buffer: RolloutBuffer | None = None
        self.stream: Iterator[list[int]] | None = None  # set by start
        self._executor = ThreadPoolExecutor(max_workers=1) if cfg.trl.async_prefetch else None
        self._prefetched: tuple[int, list[int], Future] | None = None

    def total_steps(self) -> int:
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps
        batches = math.ceil(self.cfg.num_epochs * len(self.data.train) / self.global_prompts)
        return max(1, batches) * self.s.num_iterations

    def start(self, state) -> None:
        self.stream = global_micro_batches(
            len(self.data.train), self.global_prompts, self.cfg.seed, state.data_position
        )
        # Before the first rollout: a resumed policy is not the base model, and a full-weight server may hold
        # anything (the backend decides what this first call must send).
        self.backend.sync(self.model, state.step)

    # -- rollout batches -------------------------------------------------------------------------

    def _local_rows(self, piece: list[int]) -> tuple[list[int], list]:
        rank = self.accelerator.process_index
        positions = list(range(rank * self.local_prompts, (rank + 1) * self.local_prompts))
        return positions, [self.data.train[piece[i]] for i in positions]

    def _samples(self, generation: int, piece: list[int]) -> list[Sample]:
        positions, rows = self._local_rows(piece)
        # Keyed by the prompt's place in the global batch: the same rollouts for any process layout.
        seeds = [mix_seed(self.cfg.seed, generation, p) for p in positions]
        return roll_out(self.backend, rows, self.s, self.tokenizer, seeds)

    def _next_samples(self, generation: int) -> tuple[list[int], list[Sample]]:
        if self.stream is None:
            raise RuntimeError("StructuredRunner.run before start: the loop calls start first")
        stream = self.stream
        if self._prefetched is not None and self._prefetched[0] == generation:
            _, piece, future = self._prefetched
            samples = future.result()
        else:
            piece = next(stream)
            samples = self._samples(generation, piece)
        self._prefetched = None
        last = (self.total_steps() - 1) // self.s.num_iterations  # the run's final rollout batch
        if self._executor is not None and generation < last:
            # Generate the next batch on the server while this one trains (staleness: one batch, plus
            # up to vllm_sync_interval steps before the server sees new weights; IS-corrected).
            upcoming = next(stream)
            self._prefetched = (
                generation + 1,
                upcoming,
                self._executor.submit(self._samples, generation + 1, upcoming),
            )
        return piece, samples

    def _make_buffer(self, generation: int, state) -> RolloutBuffer:
        # Rollouts, scoring and old log-probs take no gradient: under FSDP they run on gathered weights.
        with self.sharding.gathered():
            return self._scored_buffer(generation, state)

    def _scored_buffer(self, generation: int, state) -> RolloutBuffer:
        acc, s = self.accelerator, self.s
        piece, samples = self._next_samples(generation)
        _, rows = self._local_rows(piece)

        def batch_std(reward: torch.Tensor) -> float:
            r = reward.double().flatten()
            stats = reduce_sum(acc, torch.stack([r.sum(), (r**2).sum(), r.new_tensor(r.numel())]).to(acc.device))
            total, squares, count = (float(v) for v in stats)
            return math.sqrt(max(squares - total**2 / count, 0.0) / max(count - 1, 1))

        scores = score(self.features, rows, samples, s, self.pad_id, batch_size=FEATURE_BATCH, batch_std=batch_std)
        buffer = RolloutBuffer(
            rows=rows,
            samples=samples,
            scores=scores,
            advantage=scores.advantage.flatten().cpu(),
            generation=generation,
        )
        if s.num_iterations > 1:
            buffer.old_logprobs = old_logprobs(self.model, samples, s, self.pad_id, self.cfg.micro_batch_size, self.amp)
        state.data_position += 1
        return buffer

    # -- one optimizer step ----------------------------------------------------------------------

    def run(self, step: int, state) -> StepOutput[StructuredStats]:
        cfg, s, acc = self.cfg, self.s, self.accelerator
        generation = (step - 1) // s.num_iterations
        buf = self.buffer
        fresh = buf is None or buf.generation != generation
        if buf is None or fresh:
            buf = self.buffer = self._make_buffer(generation, state)
        G, mb = s.num_generations, cfg.micro_batch_size

        ce_samples = buf.references(self.tokenizer, s) if s.ce_coef > 0 else []
        local = torch.tensor(
            [
                len(buf.samples),
                sum(loss_token_count(q) for q in buf.samples),
                sum(loss_token_count(q) for q in ce_samples),
            ],
            dtype=torch.float64,
        )
        sequences, tokens, ce_tokens = (int(v) for v in reduce_sum(acc, local.to(acc.device)))
        norm = LossNorm(
            sequences=sequences,
            tokens=tokens,
            max_completion_length=s.max_completion_length,
            micro_batches=cfg.gradient_accumulation_steps * acc.num_processes,
        )
        stats = StructuredStats()
        for k in range(cfg.gradient_accumulation_steps):
            indices = list(range(k * mb, (k + 1) * mb))
            ce_rows = [i // G for i in indices if i % G == 0]  # a prompt's CE goes with its first sample
            stats += microbatch(
                self.model,
                buf,
                indices,
                ce_rows,
                s,
                norm,
                ce_tokens,
                self.tokenizer,
                pad_id=self.pad_id,
                autocast_dtype=self.amp,
                sharding=self.sharding,
            )
        stats += self._rollout_stats(buf)
        stats += StructuredStats(ce_tokens=float(local[2]))
        records = self._records(buf, step) if (fresh and self.keep_records) else []
        return StepOutput(stats=stats, records=records)

    def _rollout_stats(self, buf: RolloutBuffer) -> StructuredStats:
        """The rollout batch's fields of the statistics (the micro-batches leave them at zero)."""
        sc = buf.scores
        adv = buf.advantage.double()
        reward = sc.reward.double()
        return StructuredStats(
            samples=float(len(buf.samples)),
            groups=float(len(buf.rows)),
            alignment=float(sc.alignment.sum()),
            diversity=float(sc.diversity.sum()),
            reward=float(reward.sum()),
            reward_sq=float((reward**2).sum()),
            advantage=float(adv.sum()),
            advantage_sq=float((adv**2).sum()),
            cfm=float(sc.cfm.sum()),
            completion_tokens=float(sum(q.generated_tokens for q in buf.samples)),
            truncated=float(sum(not q.finished for q in buf.samples)),
        )

    def _records(self, buf: RolloutBuffer, step: int) -> list[dict]:
        """completions.jsonl rows: prompt, completion, ground truth, reward terms and advantage."""
        G, sc = self.s.num_generations, buf.scores
        first = self.accelerator.process_index * self.local_prompts * G
        out = []
        for i, q in enumerate(buf.samples):
            p, j = divmod(i, G)
            row = buf.rows[p]
            out.append(
                {
                    "sample": first + i,
                    "prompt": self.tokenizer.decode(list(row.prompt_ids), skip_special_tokens=False),
                    "completion": q.text,
                    "ground_truth": row.ground_truth,
                    "finished": q.finished,
                    "completion_tokens": q.generated_tokens,
                    "alignment": float(sc.alignment[p, j]),
                    "diversity": float(sc.diversity[p, j]),
                    "reward": float(sc.reward[p, j]),
                    "advantage": float(buf.advantage[i]),
                }
            )
        return out

    # -- metrics ---------------------------------------------------------------------------------

    def metrics(self, stats: StructuredStats, steps: int, seconds: float) -> dict[str, float]:
        """See ``StructuredStats.metrics``."""
        return stats.metrics(steps, seconds, ce=self.s.ce_coef > 0, skipping=self.s.skip_zero_advantage_batches)

    def show_records(self, console, records: list[dict]) -> None:
        """The first ``trl.num_completions_to_print`` completions of a fresh rollout batch (None: all)."""
        count = self.cfg.trl.num_completions_to_print
        if console is None or count == 0:
            return
        for r in records[:count]:
            console.print(
                f"[sample {r['sample']}] reward {r['reward']:+.3f} adv {r['advantage']:+.3f}\n"
                f"  prompt: {r['prompt'][-200:]!r}\n  completion: {r['completion'][:400]!r}",
                markup=False,
                highlight=False,
            )

    def previews(self, records: list[dict]) -> list[Preview]:
        """Every completion of a fresh rollout batch with its reward."""
        return [Preview(f"sample {r['sample']}", r["reward"], r["completion"]) for r in records]

    # -- around the optimizer step ---------------------------------------------------------------

    def after_update(self, step: int) -> None:
        self.backend.sync(self.model, step)

    def save(self, directory: Path, rank: int) -> None:
        """A rollout batch still to be reused (num_iterations > 1) goes into the checkpoint, so a resumed
        run trains on exactly the completions the uninterrupted run would have."""
        if self.buffer is not None and self.s.num_iterations > 1:
            buffer_state.save(self.buffer, directory, rank)

    def load(self, directory: Path, rank: int) -> None:
        saved = buffer_state.load(directory, rank)
        if saved is not None:
            self.buffer = saved

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self.backend.close()


def build(parts: Parts) -> StructuredRunner:
    """The structured runner over the loop's parts, with its rollout backend: sampling on the training
    device, or a vLLM server (``trl.use_vllm``)."""
    cfg, tokenizer = parts.cfg, parts.tokenizer
    sampling = Sampling.from_trl(cfg.trl, tokenizer.eos_token_id)
    if cfg.trl.use_vllm:
        backend = vllm_backend(cfg, sampling, gathered=parts.sharding.gathered)
    else:
        backend = HFGenerate(
            parts.model, sampling=sampling, pad_token_id=tokenizer.pad_token_id, autocast_dtype=parts.autocast_dtype
        )
    return StructuredRunner(
        cfg,
        model=parts.model,
        features=parts.features,
        tokenizer=tokenizer,
        data=parts.data,
        accelerator=parts.accelerator,
        autocast_dtype=parts.autocast_dtype,
        backend=backend,
        sharding=parts.sharding,
    )


def workload(cfg: TrainConfig, shape: ModelShape) -> Workload:
    """The memory plan's token counts of a structured rollout batch and step on one process (full-length
    prompts and completions); hybrid bodies read padded rows, not packed ones."""
    trl = cfg.trl
    return structured_workload(
        sequence_len=cfg.sequence_len,
        completion_len=trl.max_completion_length,
        generations=trl.num_generations,
        micro_batch=cfg.micro_batch_size,
        prompts=max(cfg.micro_batch_size * cfg.gradient_accumulation_steps // trl.num_generations, 1),
        feature_batch=FEATURE_BATCH,
        on_device=not trl.use_vllm,
        shared_prefill=trl.repetition_penalty == 1,
        packed=not shape.hybrid,
    )


MODE = Mode(load_data=load_structured, build=build, workload=workload, evaluator=held_out_evaluator)

"""The training loop: accelerate, optimizer, schedule, accumulation, logging, checkpoints (DESIGN 3).

One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``micro_batch_size`` documents
on each of the accelerate processes. Every micro-batch is rolled out with the current weights, so
each step is on-policy (reference spec 7: one optimizer step per rollout batch).

Exactness across layouts: the documents of a step, and each document's rollout randomness (keyed by
seed, step and the document's place in the step), do not depend on how the step is split into
micro-batches or processes, and every loss is divided by the whole step's token counts; gradients
are summed across micro-batches and processes. So 1 x 8 == 8 x 1 == 2 processes x 4.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ebft import checkpoint as ckpt
from ebft.config import TrainConfig, dump_config
from ebft.data.collate import collate_documents
from ebft.errors import ConfigError, EbftError
from ebft.metrics import MetricsLogger, Progress, RolloutLog, peak_memory_bytes
from ebft.models import autocast_dtype, check_model_config, feature_network_for, load_policy, load_tokenizer
from ebft.strided.step import (
    StepTotals,
    StridedSettings,
    count_targets,
    document_generators,
    strided_microbatch,
)

log = logging.getLogger("ebft")


class TrainingInterrupted(EbftError):
    """The run was stopped by a signal after saving a checkpoint."""


class TooManySkippedSteps(EbftError):
    """Too many consecutive steps had a non-finite loss, reward or gradient."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    last_metrics: dict[str, float]


@dataclass
class Window:
    """Sums since the last logged step (saved in checkpoints so a resumed run logs the same means)."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        fused=cfg.optimizer == "adamw_torch_fused",
    )


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil((cfg.warmup_ratio or 0.0) * total_steps)
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def global_micro_batches(num_rows: int, size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Row indices of each global micro-batch of ``size`` documents, from micro-batch ``start`` on.

    The rows form one stream, a fresh permutation (seeded by seed + epoch) per pass over the data, cut
    into fixed-size pieces; a piece may straddle two epochs. Deterministic, so a resumed run continues
    with exactly the documents the uninterrupted run would have seen.
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


def total_optimizer_steps(cfg: TrainConfig, num_rows: int, num_processes: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    docs_per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * num_processes
    return max(1, math.ceil(cfg.num_epochs * num_rows / docs_per_step))


def step_metrics(sums: dict[str, float], s: StridedSettings) -> dict[str, float]:
    """Turn summed micro-batch quantities into the logged means (seed metric names)."""
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
    return out


@contextmanager
def stop_on_signals():
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second exits at once."""
    requested: list[int] = []

    def handler(signum, _frame):
        if requested:
            sys.stderr.write("second signal: exiting now without saving\n")
            sys.stderr.flush()
            import os

            os._exit(128 + signum)
        requested.append(signum)
        sys.stderr.write("stopping after this step; a checkpoint will be saved (signal again to exit at once)\n")

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signal handling to the caller
        previous = {}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _reduce_sum(accelerator, values: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(values, reduction="sum") if accelerator.num_processes > 1 else values


def _all_reduce_grads(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over processes: each process's loss is already divided by the global token counts."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    start = 0
    for p in params:
        n = p.numel()
        p.grad = flat[start : start + n].view_as(p).clone()
        start += n


def train(cfg: TrainConfig, *, config_dir: Path | None = None, console=None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    from ebft.data.load import load_strided_datasets

    if cfg.ebft.mode != "strided":
        raise ConfigError(
            "ebft.mode: 'structured' training is not available in this version of ebft; set ebft.mode: strided"
        )
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, is_main = accelerator.device, accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    out_dir = Path(cfg.output_dir)
    resume_dir = ckpt.resolve_resume(out_dir, cfg.resume_from_checkpoint)
    if resume_dir is None and (found := ckpt.run_in_progress(out_dir)):
        raise ConfigError(
            f"output_dir: {out_dir} already holds a run ({', '.join(found[:3])}); continue it with "
            "--resume_from_checkpoint=latest, or choose another output_dir"
        )
    set_seed(cfg.seed)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(cfg))

    check_model_config(cfg)
    tokenizer = load_tokenizer(cfg)
    data = load_strided_datasets(cfg, tokenizer, search_dir=config_dir)
    model = load_policy(cfg, tokenizer, device)
    amp_dtype = autocast_dtype(cfg, device)
    # Built before any checkpoint is loaded: for full fine-tuning the feature network is a frozen copy of
    # the *base* weights, also on resume.
    features = feature_network_for(cfg, model, device)
    settings = StridedSettings.from_config(cfg.ebft)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    total_steps = total_optimizer_steps(cfg, len(data.train), world)
    scheduler = build_scheduler(cfg, optimizer, total_steps)

    state, window = ckpt.TrainState(), Window()
    if resume_dir is not None:
        state = ckpt.load_checkpoint(
            resume_dir, model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator
        )
        window = Window(**state.window) if state.window else Window()
        if is_main:
            for name in ("metrics.jsonl", "rollouts.jsonl"):
                ckpt.truncate_jsonl(out_dir / name, state.step)
        log.info("resuming from %s at step %d", resume_dir, state.step)

    mb, gas = cfg.micro_batch_size, cfg.gradient_accumulation_steps
    batches = global_micro_batches(len(data.train), mb * world, cfg.seed, start=state.data_position)
    pad_id = tokenizer.pad_token_id
    rollout_log = RolloutLog(out_dir / "rollouts.jsonl") if (cfg.ebft.log_rollouts and is_main) else None
    logger = MetricsLogger(
        out_dir,
        use_tensorboard=cfg.use_tensorboard,
        wandb_project=cfg.wandb_project,
        wandb_entity=cfg.wandb_entity,
        wandb_name=cfg.wandb_name,
        config_dict=cfg.model_dump(mode="json"),
        is_main=is_main,
        console=console,
    )

    def save(name: str) -> Path:
        target = out_dir / name
        state.window = {"sums": dict(window.sums), "steps": window.steps}
        ckpt.save_checkpoint(
            target,
            model=model,
            tokenizer=tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
            state=state,
            accelerator=accelerator,
        )
        if is_main:
            ckpt.rotate(out_dir, cfg.save_total_limit)
        return target

    last: dict[str, float] = {}
    model.train()
    progress = Progress(
        total_steps, description="ebft strided", completed=state.step, is_main=is_main, console=logger.console
    )
    with logger, progress as bar, stop_on_signals() as stop:
        while state.step < total_steps:
            step = state.step + 1
            started = time.perf_counter()
            pieces = [next(batches) for _ in range(gas)]
            local = [
                collate_documents([data.train[i] for i in piece[rank * mb : (rank + 1) * mb]], pad_id).to(device)
                for piece in pieces
            ]
            counts = torch.tensor(
                [[c.rl_tokens, c.ce_tokens] for c in (count_targets(b, settings) for b in local)], dtype=torch.float64
            ).sum(0)
            counts = _reduce_sum(accelerator, counts.to(device))
            totals = StepTotals(int(counts[0]), int(counts[1]))
            sums: dict[str, float] = {}
            records: list[dict] = []
            for index, batch in enumerate(local):
                first_doc = index * mb * world + rank * mb  # the document's place in the global step
                result = strided_microbatch(
                    model,
                    features,
                    batch,
                    settings,
                    totals,
                    autocast_dtype=amp_dtype,
                    generators=document_generators(cfg.seed, step, first_doc, batch.input_ids.shape[0], device),
                    keep_rollouts=cfg.ebft.log_rollouts,
                )
                for key, value in result.sums.items():
                    sums[key] = sums.get(key, 0.0) + value
                sums["loss"] = sums.get("loss", 0.0) + result.loss
                records.extend({"document": first_doc + d, **r} for d, r in enumerate(result.rollouts))

            keys = sorted(sums)
            reduced = _reduce_sum(
                accelerator, torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
            )
            sums = dict(zip(keys, reduced.tolist(), strict=True))
            _all_reduce_grads(accelerator, params)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            finite = all(math.isfinite(v) for v in sums.values()) and math.isfinite(grad_norm)
            lr = scheduler.get_last_lr()[0]
            if finite:
                optimizer.step()
                scheduler.step()
                state.consecutive_skips = 0
            else:
                state.skipped_steps += 1
                state.consecutive_skips += 1
                log.warning("step %d: non-finite loss, reward or gradient; update skipped", step)
            optimizer.zero_grad(set_to_none=True)
            state.step, state.data_position = step, state.data_position + gas
            elapsed = time.perf_counter() - started

            if cfg.ebft.log_rollouts:
                gathered = gather_object(records) if world > 1 else records
                if rollout_log is not None:
                    rollout_log.append([{"step": step, **r} for r in sorted(gathered, key=lambda r: r["document"])])
            if finite:
                window.add({**sums, "grad_norm": grad_norm, "seconds": elapsed})
            if step % cfg.logging_steps == 0 or step == total_steps:
                last = _logged(window, settings, lr, device) if window.steps else {}
                last["ebft/skipped_steps"] = float(state.skipped_steps)
                logger.log(step, last)
                window = Window()
            bar.advance(1, postfix=f"reward {last.get('ebft/mean_reward', float('nan')):+.3f}")

            if state.consecutive_skips >= cfg.max_consecutive_skipped_steps:
                saved = save(f"checkpoint-{step}")
                raise TooManySkippedSteps(
                    f"{state.consecutive_skips} consecutive steps had a non-finite loss, reward or gradient "
                    f"(last at step {step}); stopped. The last good state is saved in {saved}. Lower the "
                    "learning_rate, set max_grad_norm, or check the data."
                )
            stop_now = _reduce_sum(accelerator, torch.tensor([float(bool(stop))], device=device)).item() > 0
            if stop_now:
                saved = save(f"checkpoint-{step}")
                raise TrainingInterrupted(
                    f"interrupted at step {step}; checkpoint saved to {saved}. Resume with: "
                    f"ebft train <config> --output_dir={out_dir} --resume_from_checkpoint=latest"
                )
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
                save(f"checkpoint-{step}")
    if is_main:
        ckpt.write_model(model, tokenizer, out_dir)
    accelerator.wait_for_everyone()
    return TrainResult(output_dir=out_dir, steps=total_steps, last_metrics=last)


def _logged(window: Window, s: StridedSettings, lr: float, device) -> dict[str, float]:
    sums, steps = window.sums, window.steps
    out = step_metrics(sums, s)
    out["grad_norm"] = sums["grad_norm"] / steps
    out["learning_rate"] = lr
    out["tokens_per_second"] = (sums["doc_tokens"] + sums["rl_tokens"]) / max(sums["seconds"], 1e-9)
    out["step_seconds"] = sums["seconds"] / steps
    out["peak_memory_mib"] = peak_memory_bytes(device) / 2**20
    return out

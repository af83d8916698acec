"""The training loop: accelerate, optimizer, schedule, accumulation, logging, checkpoints (DESIGN 3).

One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``micro_batch_size`` documents.
Each micro-batch is rolled out with the current weights, so every step is on-policy (reference spec 7:
exactly one optimizer step per rollout batch).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ebft.config import TrainConfig, dump_config
from ebft.data.collate import DocumentBatch, collate_documents
from ebft.errors import ConfigError
from ebft.features import layer_indices
from ebft.metrics import MetricsLogger, Progress, RolloutLog, peak_memory_bytes
from ebft.models import FeatureNetwork, load_policy, load_tokenizer, use_bf16
from ebft.strided.step import (
    StepTotals,
    StridedSettings,
    count_targets,
    document_generators,
    strided_microbatch,
)

log = logging.getLogger("ebft")


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    last_metrics: dict[str, float]


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


def micro_batches(rows, size: int, seed: int, start_epoch: int = 0) -> Iterator[list[dict]]:
    """Endless shuffled micro-batches; a new permutation (seed + epoch) every pass over the rows."""
    epoch = start_epoch
    while True:
        gen = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(rows), generator=gen).tolist()
        for start in range(0, len(order), size):
            yield [rows[i] for i in order[start : start + size]]
        epoch += 1


def total_optimizer_steps(cfg: TrainConfig, num_rows: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = math.ceil(num_rows / cfg.micro_batch_size)
    return max(1, math.ceil(cfg.num_epochs * per_epoch / cfg.gradient_accumulation_steps))


def _to_device(batch: DocumentBatch, device: torch.device) -> DocumentBatch:
    return DocumentBatch(**{k: v.to(device) for k, v in vars(batch).items()})


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


def write_model(model, tokenizer, directory: Path, step: int) -> None:
    """The model (or LoRA adapter) and tokenizer in HF format, plus the step they were taken at."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "trainer_state.json").write_text(json.dumps({"step": step}))


def save_checkpoint(model, tokenizer, directory: Path, step: int) -> None:
    """Write into a temporary folder, then rename: a crash mid-save leaves the previous checkpoint intact."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write_model(model, tokenizer, tmp, step)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def train(cfg: TrainConfig, *, console=None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ebft.data.load import load_strided_datasets

    if cfg.ebft.mode != "strided":
        raise ConfigError(
            "ebft.mode: 'structured' training is not available in this version of ebft; set ebft.mode: strided"
        )
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    is_main = accelerator.is_main_process
    set_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(cfg))

    tokenizer = load_tokenizer(cfg)
    data = load_strided_datasets(cfg, tokenizer)
    model = load_policy(cfg, tokenizer, device)
    bf16 = use_bf16(cfg.bf16, device)
    autocast_dtype = torch.bfloat16 if bf16 else None
    num_layers = model.config.num_hidden_layers
    feature_device = torch.device(cfg.ebft.feature_device) if cfg.ebft.feature_device else device
    features = FeatureNetwork(
        model,
        layer_indices(cfg.ebft.feature_layers, num_layers),
        device=feature_device,
        autocast_dtype=autocast_dtype,
    )
    settings = StridedSettings.from_config(cfg.ebft)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    total_steps = total_optimizer_steps(cfg, len(data.train))
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    batches = micro_batches(data.train, cfg.micro_batch_size, cfg.seed)
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
    last: dict[str, float] = {}
    window: dict[str, float] = {}
    window_steps = 0
    model.train()
    with (
        logger,
        Progress(total_steps, description="ebft strided", is_main=is_main, console=logger.console) as bar,
    ):
        for step in range(1, total_steps + 1):
            started = time.perf_counter()
            micro = [
                _to_device(collate_documents(next(batches), pad_id), device)
                for _ in range(cfg.gradient_accumulation_steps)
            ]
            counts = [count_targets(mb, settings) for mb in micro]
            totals = StepTotals(sum(c.rl_tokens for c in counts), sum(c.ce_tokens for c in counts))
            sums: dict[str, float] = {}
            records: list[dict] = []
            first_doc = 0
            for mb in micro:
                docs = mb.input_ids.shape[0]
                result = strided_microbatch(
                    model,
                    features,
                    mb,
                    settings,
                    totals,
                    autocast_dtype=autocast_dtype,
                    generators=document_generators(cfg.seed, step, first_doc, docs, device),
                    keep_rollouts=rollout_log is not None,
                )
                first_doc += docs
                for key, value in result.sums.items():
                    sums[key] = sums.get(key, 0.0) + value
                records.extend(result.rollouts)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started

            if rollout_log is not None:
                rollout_log.append([{"step": step, "document": d, **r} for d, r in enumerate(records)])
            for key, value in sums.items():
                window[key] = window.get(key, 0.0) + value
            window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm
            window["seconds"] = window.get("seconds", 0.0) + elapsed
            window_steps += 1
            if step % cfg.logging_steps == 0 or step == total_steps:
                last = step_metrics(window, settings)
                last["grad_norm"] = window["grad_norm"] / window_steps
                last["learning_rate"] = lr
                last["tokens_per_second"] = (window["doc_tokens"] + window["rl_tokens"]) / max(window["seconds"], 1e-9)
                last["step_seconds"] = window["seconds"] / window_steps
                last["peak_memory_mib"] = peak_memory_bytes(device) / 2**20
                logger.log(step, last)
                window, window_steps = {}, 0
            bar.advance(1, postfix=f"reward {last.get('ebft/mean_reward', float('nan')):+.3f}")
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps and is_main:
                save_checkpoint(model, tokenizer, out_dir / f"checkpoint-{step}", step)
    if is_main:
        write_model(model, tokenizer, out_dir, total_steps)
    return TrainResult(output_dir=out_dir, steps=total_steps, last_metrics=last)

"""Supervised fine-tuning: teacher-forced cross-entropy on the documents of a training config.

The baseline that the quickstart compares EBFT with (and its from-scratch pretraining loop). It reads
a ``TrainConfig`` exactly as ``ebft train`` does and takes the same rows in the same order
(``loop.global_micro_batches``), with the same optimizer, schedule, accumulation and clipping, so
that two runs from one config differ only in their objective. The ``ebft:`` RL keys are not used,
except that the strided layout keys decide which rows are usable (as in training).

Loss of a step: the mean NLL over every labelled target (labels != -100) of all its micro-batches.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ebft.config import dump_config
from ebft.data.collate import collate_documents
from ebft.data.load import load_strided_datasets
from ebft.losses import token_logprobs
from ebft.modeling.parts import backbone_of, output_head
from ebft.modeling.policy import load_policy
from ebft.modeling.precision import use_bf16
from ebft.modeling.tokenizer import load_tokenizer
from ebft.train.batches import global_micro_batches
from ebft.train.loop import TrainResult
from ebft.train.optim import build_optimizer, build_scheduler
from ebft.train.reporting import MetricsLogger, Progress


@dataclass
class _Window:
    """Sums since the last logged step."""

    ce_sum: float = 0.0
    targets: int = 0
    tokens: int = 0
    grad_norm: float = 0.0
    seconds: float = 0.0
    steps: int = 0
    lr: float = 0.0

    def metrics(self) -> dict[str, float]:
        ce = self.ce_sum / max(self.targets, 1)
        return {
            "loss": ce,
            "ce_loss": ce,
            "learning_rate": self.lr,
            "grad_norm": self.grad_norm / max(self.steps, 1),
            "tokens_per_second": self.tokens / max(self.seconds, 1e-9),
        }


def _save(model, tokenizer, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def train_sft(
    cfg,
    *,
    config_dir: str | Path | None = None,
    console=None,
    description: str = "sft",
    time_limit_s: float | None = None,
) -> TrainResult:
    """Train ``cfg.base_model`` (full weights, or a LoRA adapter with ``adapter: lora``) with CE.

    Writes ``output_dir/metrics.jsonl`` (``loss`` = ``ce_loss``, ``learning_rate``, ``grad_norm``,
    ``tokens_per_second``), ``checkpoint-N`` folders every ``save_steps`` (model and tokenizer), and the
    final model. ``time_limit_s`` stops the loop early once that much time has passed; the returned
    ``steps`` says how many optimizer steps were taken.
    """
    from accelerate.utils import set_seed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(dump_config(cfg))

    tokenizer = load_tokenizer(cfg)
    rows = load_strided_datasets(cfg, tokenizer, search_dir=config_dir).train
    model = load_policy(cfg, tokenizer, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(cfg.bf16, device) else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    mb, gas = cfg.micro_batch_size, cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * len(rows) / (mb * gas)))
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    batches = global_micro_batches(len(rows), mb, cfg.seed)
    body, head = backbone_of(model), output_head(model)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf

    started = time.perf_counter()
    window = _Window()
    last: dict[str, float] = {}
    step = 0
    model.train()
    logger = MetricsLogger(out_dir, console=console)
    with logger, Progress(total_steps, description=description, console=logger.console) as bar:
        while step < total_steps:
            if time_limit_s is not None and time.perf_counter() - started > time_limit_s:
                break
            step += 1
            step_start = time.perf_counter()
            micro = [collate_documents([rows[i] for i in next(batches)], tokenizer.pad_token_id) for _ in range(gas)]
            targets = sum(int((b.labels[:, 1:] != -100).sum()) for b in micro)
            for batch in micro:
                batch = batch.to(device)
                mask = batch.labels[:, 1:] != -100  # [D, L-1]: target p+1 is predicted at position p
                with autocast:
                    hidden = body(input_ids=batch.input_ids, use_cache=False).last_hidden_state  # [D, L, H]
                    logp = token_logprobs(hidden[:, :-1][mask], batch.input_ids[:, 1:][mask], head)
                nll = -logp.sum()
                (nll / max(targets, 1)).backward()
                window.ce_sum += float(nll.detach())
                window.tokens += int(batch.lengths.sum())
            window.grad_norm += float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            window.lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window.targets += targets
            window.seconds += time.perf_counter() - step_start
            window.steps += 1
            if step % cfg.logging_steps == 0 or step == total_steps:
                last = window.metrics()
                logger.log(step, last)
                window = _Window()
            bar.advance(1, postfix=f"ce {last.get('ce_loss', float('nan')):.3f}")
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
                _save(model, tokenizer, out_dir / f"checkpoint-{step}")
        if window.steps:  # stopped by the time limit between two logged steps
            last = window.metrics()
            logger.log(step, last)
    _save(model, tokenizer, out_dir)
    return TrainResult(output_dir=out_dir, steps=step, last_metrics=last)

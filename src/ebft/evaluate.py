"""``ebft evaluate``: the paper's strided evaluation of a base model or a checkpoint (reference spec 9.1, 9.3).

On every held-out document: strided rollouts exactly as in training (n samples per block at the
training temperature, the same anchors), scored by the frozen feature network of the *base* model, so
every checkpoint is measured in the same feature space. Reported:

* alignment, diversity and reward with the training settings (whitening included), averaged over all
  (block, sample) pairs; alignment and reward also best-of-n (per block the best of the n samples);
* the conditional feature-matching loss, estimated without bias from the n samples on unit-norm,
  unwhitened features (``eval_metrics.cfm_unbiased``);
* teacher-forced cross-entropy and perplexity over all tokens and over answer tokens only.

Documents come from the config's validation split (``val_set_size``), or from its datasets read at
``--split``. Per-document values are kept so that two models can be compared document by document.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ebft import eval_metrics
from ebft.errors import ConfigError, EbftError

log = logging.getLogger("ebft")

# Every reported metric: (key, label, which way is better) in table order.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("cfm_loss", "feature-matching loss (CFM, unbiased)", "lower"),
    ("alignment", "alignment (2 cos to ground truth)", "higher"),
    ("alignment_best_of_n", "alignment, best of n", "higher"),
    ("diversity", "diversity (similarity between samples)", "lower"),
    ("reward", "reward (alignment - diversity)", "higher"),
    ("reward_best_of_n", "reward, best of n", "higher"),
    ("ce_loss", "cross-entropy, all tokens", "lower"),
    ("perplexity", "perplexity, all tokens", "lower"),
    ("answer_ce_loss", "cross-entropy, answer tokens", "lower"),
    ("answer_perplexity", "perplexity, answer tokens", "lower"),
)


@dataclass
class EvalResult:
    """metrics: the table's values (None where nothing was counted); documents: one dict per document
    (its ``index`` in the held-out set, token and block counts, and the same metrics); info: what was
    evaluated on what, with which settings."""

    metrics: dict[str, float | None]
    documents: list[dict]
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"metrics": self.metrics, **self.info, "documents": self.documents}


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


# ---------------------------------------------------------------------------------------------
# Loading


def _checkpoint_kind(checkpoint: Path) -> str:
    if (checkpoint / "adapter_config.json").is_file():
        return "lora"
    if (checkpoint / "config.json").is_file():
        return "full"
    if not checkpoint.exists():
        raise EbftError(f"--checkpoint {checkpoint}: no such folder")
    raise EbftError(
        f"--checkpoint {checkpoint}: neither a model folder (config.json) nor a LoRA adapter folder "
        "(adapter_config.json)"
    )


def _plain(cfg, base_model: str):
    """The config, loading ``base_model`` as plain weights: no fresh adapter, no checkpointing."""
    return cfg.model_copy(update={"base_model": base_model, "adapter": None, "gradient_checkpointing": False})


def load_models(cfg, checkpoint: str | Path | None, device: torch.device):
    """(tokenizer, policy, feature source, kind) for the base model or a checkpoint.

    kind: "base", "full" (a whole model folder) or "lora" (an adapter over ``cfg.base_model``).
    The feature source is always the base model's weights: the policy itself where they are shared
    (base, or LoRA under ``disable_adapter``), else a separately loaded base model.
    """
    from ebft.models import load_policy, load_tokenizer

    if checkpoint is None:
        tokenizer = load_tokenizer(cfg)
        policy = load_policy(_plain(cfg, cfg.base_model), tokenizer, device)
        return tokenizer, policy, policy, "base"
    path = Path(checkpoint)
    kind = _checkpoint_kind(path)
    # Training saves the tokenizer with every checkpoint; prefer it (it has any added special tokens).
    has_tokenizer = (path / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(cfg.model_copy(update={"tokenizer_config": str(path)}) if has_tokenizer else cfg)
    base = load_policy(_plain(cfg, cfg.base_model), tokenizer, device)
    if kind == "full":
        policy = load_policy(_plain(cfg, str(path)), tokenizer, device)
        return tokenizer, policy, base, kind
    from peft import PeftModel

    try:
        policy = PeftModel.from_pretrained(base, str(path)).to(device)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"--checkpoint {path}: cannot load the LoRA adapter onto {cfg.base_model!r}: {exc}") from exc
    return tokenizer, policy, policy, kind


def held_out_rows(cfg, tokenizer, split: str | None, config_dir: Path | None = None):
    """(rows, description) of the documents to evaluate on.

    ``split`` given: every dataset entry read at that split, in full. Otherwise the validation part
    of the training data when ``val_set_size`` > 0 (the same rows training held out: same data, same
    seed), else the datasets as written, with a warning that they may be the training data.
    ``config_dir``: where custom transform modules are looked up (as in training).
    """
    from ebft.data.load import load_strided_datasets

    if split is not None:
        specs = [spec.model_copy(update={"split": split}) for spec in cfg.datasets]
        data = load_strided_datasets(
            cfg.model_copy(update={"datasets": specs, "val_set_size": 0.0}), tokenizer, search_dir=config_dir
        )
        return data.train, f"datasets at split '{split}'"
    if cfg.val_set_size > 0:
        data = load_strided_datasets(cfg, tokenizer, search_dir=config_dir)
        return data.val, f"validation rows (val_set_size={cfg.val_set_size:g}, seed {cfg.seed})"
    splits = ", ".join(sorted({spec.split for spec in cfg.datasets}))
    log.warning(
        "val_set_size is 0 and no --split was given: evaluating on the config's datasets as written "
        "(split %s), which may be the training data",
        splits,
    )
    return load_strided_datasets(cfg, tokenizer, search_dir=config_dir).train, f"datasets as written (split {splits})"


# ---------------------------------------------------------------------------------------------
# Scoring


def _new_sums() -> dict[str, float]:
    return dict.fromkeys(eval_metrics.SUM_KEYS, 0.0)


@torch.no_grad()
def _token_ce(policy, batch, autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced NLL per target: (nll [D, L-1], all-token mask, answer-token mask)."""
    from ebft.losses import token_logprobs
    from ebft.models import backbone_of

    mask_all, mask_answer = eval_metrics.next_token_masks(batch.lengths, batch.labels, batch.prompt_length)
    with autocast:
        hidden = backbone_of(policy)(input_ids=batch.input_ids, use_cache=False).last_hidden_state  # [D, L, H]
        logp = token_logprobs(
            hidden[:, :-1][mask_all], batch.input_ids[:, 1:][mask_all], policy.get_output_embeddings()
        )
    nll = torch.zeros(mask_all.shape, device=hidden.device)
    nll[mask_all] = -logp.float()
    return nll, mask_all, mask_answer


@torch.no_grad()
def score_batch(policy, features, batch, settings, *, generators, autocast_dtype=None) -> list[dict[str, float]]:
    """Per-document sums (``eval_metrics.SUM_KEYS``) for one collated batch of documents."""
    from ebft.strided.step import roll_out, score_rollouts

    device = batch.input_ids.device
    r = roll_out(policy, batch, settings, generators=generators, autocast_dtype=autocast_dtype)
    layout, packed, plan, positions = r.layout, r.packed, r.plan, r.positions
    hidden = features(packed, positions, plan)

    def reuse(*_args):  # one feature pass serves both scorings below
        return hidden

    scores = score_rollouts(reuse, packed, plan, positions, layout, batch.labels, settings)
    # The CFM identity needs unit-norm, unwhitened features; a and d do not depend on the coefficients.
    plain = scores
    if settings.use_whitening:
        plain = score_rollouts(
            reuse, packed, plan, positions, layout, batch.labels, dataclasses.replace(settings, use_whitening=False)
        )
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    nll, mask_all, mask_answer = _token_ce(policy, batch, autocast)

    n = layout.n
    out = []
    for d in range(layout.num_docs):
        valid = layout.valid[d]  # [K]
        a = scores.alignment[d][:, valid].T  # [K_d, n]
        r = scores.reward[d][:, valid].T
        sums = _new_sums()
        sums["samples"] = float(a.numel())
        sums["blocks"] = float(a.shape[0])
        sums["alignment"] = float(a.sum())
        sums["diversity"] = float(scores.diversity[d][:, valid].sum())
        sums["reward"] = float(r.sum())
        sums["best_alignment"] = float(eval_metrics.best_of_n(a).sum())
        sums["best_reward"] = float(eval_metrics.best_of_n(r).sum())
        if n >= 2:
            cfm = eval_metrics.cfm_unbiased(plain.alignment[d][:, valid].T, plain.diversity[d][:, valid].T)
            sums["cfm"] = float(cfm.sum())
            sums["cfm_blocks"] = float(cfm.numel())
        sums["ce_sum"] = float(nll[d][mask_all[d]].sum())
        sums["tokens"] = float(mask_all[d].sum())
        sums["answer_ce_sum"] = float(nll[d][mask_answer[d]].sum())
        sums["answer_tokens"] = float(mask_answer[d].sum())
        out.append(sums)
    return out


# ---------------------------------------------------------------------------------------------
# Orchestration


def evaluate(
    cfg,
    *,
    checkpoint: str | Path | None = None,
    split: str | None = None,
    max_docs: int | None = None,
    execute: bool = False,
    config_dir: str | Path | None = None,
    console=None,
    description: str = "evaluate",
) -> EvalResult:
    """Evaluate ``cfg.base_model`` (or ``checkpoint``) on held-out documents; see the module docstring."""
    from ebft import models
    from ebft.data.collate import collate_documents
    from ebft.metrics import Progress
    from ebft.strided.step import StridedSettings, document_generators

    if cfg.ebft.mode != "strided":
        raise ConfigError(
            "ebft.mode: structured evaluation is not available in this version of ebft; "
            "evaluate strided configs (ebft.mode: strided)"
        )
    if execute:
        raise EbftError(
            "--execute runs the unit tests carried by structured code rows (prompt, ground truth and tests, "
            "ebft.mode: structured); strided documents carry no tests, and structured evaluation is not "
            "available in this version of ebft"
        )
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, policy, feature_source, kind = load_models(cfg, checkpoint, device)
    rows, source = held_out_rows(cfg, tokenizer, split, Path(config_dir) if config_dir else None)
    if rows is None or len(rows) == 0:
        raise EbftError(f"no documents to evaluate in the {source}")
    indices = spread_indices(len(rows), max_docs)
    rows = rows.select(indices)

    amp_dtype = models.autocast_dtype(cfg, device)
    features = models.feature_network_for(cfg, feature_source, device)
    del feature_source  # a separately loaded base model lives on only as the features' frozen copy
    settings = StridedSettings.from_config(cfg.ebft)
    policy.eval()

    totals = _new_sums()
    documents: list[dict] = []
    size = cfg.micro_batch_size
    with Progress(len(rows), description=description, console=console) as bar:
        for start in range(0, len(rows), size):
            chunk = [rows[i] for i in range(start, min(start + size, len(rows)))]
            batch = collate_documents(chunk, tokenizer.pad_token_id).to(device)
            # Sampling seeds are keyed by the document's place in the evaluation set (step 0 is never a
            # training step), so two models are evaluated on identically seeded rollouts.
            generators = document_generators(cfg.seed, 0, start, len(chunk), device)
            per_doc = score_batch(policy, features, batch, settings, generators=generators, autocast_dtype=amp_dtype)
            for offset, sums in enumerate(per_doc):
                for key, value in sums.items():
                    totals[key] += value
                documents.append(
                    {
                        "index": indices[start + offset],
                        "tokens": int(batch.lengths[offset]),
                        "blocks": int(sums["blocks"]),
                        **eval_metrics.summarise(sums),
                    }
                )
            bar.advance(len(chunk))

    metrics = eval_metrics.summarise(totals)
    seconds = time.perf_counter() - started
    info = {
        "model": {
            "base_model": cfg.base_model,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "kind": kind,
        },
        "data": {
            "source": source,
            "documents": len(rows),
            "blocks": int(totals["blocks"]),
            "tokens": int(totals["tokens"]),
            "answer_tokens": int(totals["answer_tokens"]),
        },
        "settings": {
            "n_samples_per_prompt": settings.n_samples_per_prompt,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "stride": settings.stride,
            "context_length": settings.context_length,
            "generate_max_len": settings.generate_max_len,
            "feature_layers": list(cfg.ebft.feature_layers),
            "embed_method": settings.embed_method,
            "feature_norm": settings.feature_norm,
            "use_whitening": settings.use_whitening,
            "alignment_coef": settings.alignment_coef,
            "diversity_coef": settings.diversity_coef,
            "seed": cfg.seed,
        },
        "seconds": seconds,
    }
    if settings.n_samples_per_prompt < 2:
        info["notes"] = ["n_samples_per_prompt is 1: the unbiased CFM estimate needs 2 samples per block"]
    return EvalResult(metrics=metrics, documents=documents, info=info)


# ---------------------------------------------------------------------------------------------
# Output


def json_safe(value):
    """JSON has no inf/NaN: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_json(result: EvalResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(result.to_json()), indent=2, allow_nan=False) + "\n")
    return path


def format_value(value: float | None) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.4g}" if abs(value) >= 1000 else f"{value:+.4f}" if value < 0 else f"{value:.4f}"


def render_table(result: EvalResult, console=None) -> None:
    """Print the metrics as a rich table, with the direction in which each one is better."""
    from rich import get_console
    from rich.table import Table

    model = result.info.get("model", {})
    data = result.info.get("data", {})
    title = model.get("checkpoint") or model.get("base_model", "")
    table = Table(
        title=f"ebft evaluate: {title}",
        caption=f"{data.get('documents', 0)} documents, "
        f"{data.get('blocks', 0)} blocks, {data.get('tokens', 0)} tokens; {data.get('source', '')}",
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("better")
    for key, label, better in METRICS:
        table.add_row(label, format_value(result.metrics.get(key)), better)
    (console or get_console()).print(table)

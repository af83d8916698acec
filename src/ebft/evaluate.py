"""``ebft evaluate``: held-out evaluation of a base model or a checkpoint (reference spec 9).

Every model is scored by the frozen feature network of the *base* model, so every checkpoint is
measured in the same feature space, on rollouts seeded by the held-out row's place (two models get
identically seeded samples).

**Strided configs** (spec 9.1, 9.3): on every held-out document, strided rollouts exactly as in
training (n samples per block at the training temperature, the same anchors). Reported:

* alignment, diversity and reward with the training settings (whitening included), averaged over all
  (block, sample) pairs; alignment and reward also best-of-n (per block the best of the n samples);
* the conditional feature-matching loss, estimated without bias from the n samples on unit-norm,
  unwhitened features (``eval_metrics.cfm_unbiased``);
* teacher-forced cross-entropy and perplexity over all tokens and over answer tokens only.

**Structured configs**: on every held-out prompt row, ``trl.num_generations`` full completions with
transformers generate and the trl sampling settings (multi-turn rows rolled out turn by turn). The
same keys, with a prompt in the place of a block: alignment, diversity and reward per completion,
best-of-n and CFM per prompt; CE over prompt + ground truth and over the ground-truth tokens the policy
would write. Also the mean completion length and the fraction of completions cut at their cap. With
``execute``, each completion's code is run against the row's unit tests in the sandbox: pass@1 and
pass@n over the rows that have tests, and the ground truth's own pass rate as a check of the tests.

Rows come from the config's validation split (``val_set_size``), or from its datasets read at
``--split``. Per-row values are kept so that two models can be compared row by row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
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
# Rows shown only when the evaluation reports them: structured configs, and --execute.
EXTRA_METRICS: tuple[tuple[str, str, str], ...] = (
    ("completion_length", "completion length, tokens (mean)", "-"),
    ("truncated_fraction", "completions cut at their cap", "-"),
    ("pass@1", "pass@1, unit tests", "higher"),
    ("pass@n", "pass@n, unit tests (n = num_generations)", "higher"),
    ("ground_truth_pass_rate", "ground truth passes its tests (check)", "1.0"),
)
# Default wall-clock seconds for one completion's code and tests under --execute.
EXEC_TIMEOUT = 3.0


@dataclass
class EvalResult:
    """metrics: the table's values (None where nothing was counted); documents: one dict per document
    (strided) or prompt row (structured): its ``index`` in the held-out set, sizes and the same metrics;
    info: what was evaluated on what, with which settings."""

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
    """(rows, description) of the documents (strided) or prompt rows (structured) to evaluate on.

    ``split`` given: every dataset entry read at that split, in full. Otherwise the validation part
    of the training data when ``val_set_size`` > 0 (the same rows training held out: same data, same
    seed), else the datasets as written, with a warning that they may be the training data.
    ``config_dir``: where custom transform modules are looked up (as in training).
    """
    if cfg.ebft.mode == "structured":
        from ebft.data.structured import load_structured_datasets as load
    else:
        from ebft.data.load import load_strided_datasets as load

    if split is not None:
        specs = [spec.model_copy(update={"split": split}) for spec in cfg.datasets]
        data = load(cfg.model_copy(update={"datasets": specs, "val_set_size": 0.0}), tokenizer, search_dir=config_dir)
        return data.train, f"datasets at split '{split}'"
    if cfg.val_set_size > 0:
        data = load(cfg, tokenizer, search_dir=config_dir)
        return data.val, f"validation rows (val_set_size={cfg.val_set_size:g}, seed {cfg.seed})"
    splits = ", ".join(sorted({spec.split for spec in cfg.datasets}))
    log.warning(
        "val_set_size is 0 and no --split was given: evaluating on the config's datasets as written "
        "(split %s), which may be the training data",
        splits,
    )
    return load(cfg, tokenizer, search_dir=config_dir).train, f"datasets as written (split {splits})"


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
# Structured scoring

# Per-prompt sums of structured rows besides ``eval_metrics.SUM_KEYS``.
STRUCTURED_SUM_KEYS = (
    "completion_tokens",  # tokens after the prompt, over the row's completions
    "truncated",  # completions cut at their cap
)


@torch.no_grad()
def _ground_truth_nll(policy, rows, tokenizer, settings, autocast_dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row, teacher-forced on its ``ce_sequences`` reference (prompt + ground truth, + EOS on single-turn
    rows): the NLL of every target token 1..T-1 ``[T-1]``, and which targets are answer tokens ``[T-1]``
    bool (the training CE term's mask)."""
    from ebft.structured.step import ce_sequences, policy_logprobs

    references = ce_sequences(rows, tokenizer, settings)
    every = [dataclasses.replace(q, loss_mask=[True] * len(q.sequence)) for q in references]
    # The model's own next-token loss, as in the training CE term: no temperature, no truncation.
    plain = dataclasses.replace(
        settings, sampling=dataclasses.replace(settings.sampling, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
    )
    logp, seq = policy_logprobs(policy, every, plain, tokenizer.pad_token_id, autocast_dtype=autocast_dtype)
    nll, seq = -logp.float().cpu(), seq.cpu()
    return [(nll[seq == i], torch.tensor(q.loss_mask[1:], dtype=torch.bool)) for i, q in enumerate(references)]


@torch.no_grad()
def score_prompts(
    policy, features, rows, samples, settings, tokenizer, *, autocast_dtype=None
) -> list[dict[str, float]]:
    """Per-prompt sums (``eval_metrics.SUM_KEYS`` and ``STRUCTURED_SUM_KEYS``) of P prompt rows and their
    P x G samples in ``roll_out`` order (sample j of row p at p * G + j). One prompt is one "block"."""
    from ebft.rewards import reward_terms
    from ebft.structured.runner import FEATURE_BATCH
    from ebft.structured.step import embed_pairs

    s, P, G = settings, len(rows), settings.num_generations
    pad = tokenizer.pad_token_id
    # Both sides as training scores them (``step.score``): whole sequences through the frozen network.
    gen, gt = embed_pairs(features, rows, samples, s, pad, FEATURE_BATCH)

    def terms(use_whitening: bool):
        return reward_terms(
            gen,
            gt,
            alignment_coef=s.alignment_coef,
            diversity_coef=s.diversity_coef,
            use_whitening=use_whitening,
            whitening_space=s.whitening_space,
        )

    scores = terms(s.use_whitening)
    # The CFM identity needs unit-norm, unwhitened features; a and d do not depend on the coefficients.
    plain = terms(False) if s.use_whitening else scores
    cfm = eval_metrics.cfm_unbiased(plain.alignment, plain.diversity)  # [P]
    nll = _ground_truth_nll(policy, rows, tokenizer, s, autocast_dtype)

    out = []
    for p in range(P):
        a, r = scores.alignment[p], scores.reward[p]  # [G]
        token_nll, answer = nll[p]
        mine = samples[p * G : (p + 1) * G]
        sums = _new_sums()
        sums.update(
            samples=float(G),
            blocks=1.0,
            cfm_blocks=1.0,
            alignment=float(a.sum()),
            diversity=float(scores.diversity[p].sum()),
            reward=float(r.sum()),
            best_alignment=float(eval_metrics.best_of_n(a)),
            best_reward=float(eval_metrics.best_of_n(r)),
            cfm=float(cfm[p]),
            ce_sum=float(token_nll.sum()),
            tokens=float(token_nll.numel()),
            answer_ce_sum=float(token_nll[answer].sum()),
            answer_tokens=float(answer.sum()),
            completion_tokens=float(sum(len(q.sequence) - q.prompt_length for q in mine)),
            truncated=float(sum(not q.finished for q in mine)),
        )
        out.append(sums)
    return out


def summarise_structured(sums: dict[str, float]) -> dict[str, float | None]:
    """``eval_metrics.summarise`` plus the mean completion length and the fraction cut at the cap (every
    prompt has num_generations >= 2 completions, so ``samples`` is never 0)."""
    return {
        **eval_metrics.summarise(sums),
        "completion_length": sums["completion_tokens"] / sums["samples"],
        "truncated_fraction": sums["truncated"] / sums["samples"],
    }


# ---------------------------------------------------------------------------------------------
# Execution (--execute)


def extract_code(text: str) -> str:
    """The code to run from a completion: the first fenced block tagged python (or py, python3) or not
    tagged at all, else the whole text. A fence left open (a completion cut at its cap) runs to the end."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if not fence.startswith("```"):
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
        if fence[3:].strip().lower() in ("", "python", "py", "python3"):
            return "\n".join(lines[i + 1 : end])
        i = end + 1  # another language's block: skip it whole, so its closing fence opens nothing
    return text


@dataclass(frozen=True)
class RowExecution:
    """Sandbox outcomes of one row's tests (``sandbox`` statuses: pass, fail, timeout, error).

    completions: one status per completion; ground_truth: the status of the row's reference answer.
    """

    completions: tuple[str, ...]
    ground_truth: str

    @property
    def passed(self) -> int:
        return self.completions.count("pass")

    def record(self) -> dict:
        n, c = len(self.completions), self.passed
        return {
            "passed": c,
            "pass@1": eval_metrics.pass_at_k(n, c, 1),
            "pass@n": eval_metrics.pass_at_k(n, c, n),
            "ground_truth_passed": self.ground_truth == "pass",
        }


def run_row_tests(
    completions: Sequence[str], ground_truth: str, tests: Sequence[str], *, timeout: float = EXEC_TIMEOUT
) -> RowExecution:
    """Run the code of every completion, and of the ground truth, followed by ``tests`` in the sandbox.

    The code is ``extract_code`` of the text; for a multi-turn row that text is the whole rolled-out rest
    of the conversation, so its first python block is what runs.
    """
    from ebft.sandbox import run_code

    def status(text: str) -> str:
        return run_code(extract_code(text), tests, timeout=timeout).status

    return RowExecution(tuple(status(text) for text in completions), status(ground_truth))


def execution_metrics(results: Sequence[RowExecution]) -> tuple[dict[str, float], dict]:
    """(metrics, counts) over the rows that have tests.

    metrics: ``pass@1`` and ``pass@n`` (unbiased estimator, n = the completions of a row, the same
    for every row) and ``ground_truth_pass_rate``. counts: rows, and how many completions and ground
    truths ended in each status.
    """
    if not results:
        raise ValueError("no rows with tests")
    pairs = [(len(r.completions), r.passed) for r in results]
    n = len(results[0].completions)
    metrics = {
        "pass@1": eval_metrics.mean_pass_at_k(pairs, 1),
        "pass@n": eval_metrics.mean_pass_at_k(pairs, n),
        "ground_truth_pass_rate": sum(r.ground_truth == "pass" for r in results) / len(results),
    }
    statuses = ("pass", "fail", "timeout", "error")
    completions = Counter(status for r in results for status in r.completions)
    truths = Counter(r.ground_truth for r in results)
    counts = {
        "rows_with_tests": len(results),
        "completions": {k: completions[k] for k in statuses},
        "ground_truth": {k: truths[k] for k in statuses},
    }
    return metrics, counts


# ---------------------------------------------------------------------------------------------
# Orchestration


@dataclass
class _Run:
    """What one mode's evaluation loop measured; ``evaluate`` adds the model, source and timing."""

    metrics: dict[str, float | None]
    documents: list[dict]
    data: dict
    settings: dict
    notes: list[str] = field(default_factory=list)
    execution: dict | None = None


def evaluate(
    cfg,
    *,
    checkpoint: str | Path | None = None,
    split: str | None = None,
    max_docs: int | None = None,
    execute: bool = False,
    exec_timeout: float = EXEC_TIMEOUT,
    config_dir: str | Path | None = None,
    console=None,
    description: str = "evaluate",
) -> EvalResult:
    """Evaluate ``cfg.base_model`` (or ``checkpoint``) on held-out rows; see the module docstring."""
    from ebft import models
    from ebft.metrics import Progress

    structured = cfg.ebft.mode == "structured"
    if execute and not structured:
        raise EbftError(
            "--execute runs the unit tests carried by structured code rows (prompt, ground truth and tests, "
            "ebft.mode: structured); strided documents carry no tests"
        )
    if exec_timeout <= 0:
        raise EbftError(f"--exec-timeout must be > 0 seconds, got {exec_timeout:g}")
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, policy, feature_source, kind = load_models(cfg, checkpoint, device)
    rows, source = held_out_rows(cfg, tokenizer, split, Path(config_dir) if config_dir else None)
    if rows is None or len(rows) == 0:
        raise EbftError(f"no documents to evaluate in the {source}")
    indices = spread_indices(len(rows), max_docs)
    if execute and not any(rows[i].tests for i in indices):
        raise EbftError(
            "--execute needs rows with unit tests: a `tests` field, e.g. OpenCodeInstruct's unit_tests via "
            f"ebft_opencode.transform; none of the {len(indices)} rows evaluated from the {source} has one"
        )

    amp_dtype = models.autocast_dtype(cfg, device)
    features = models.feature_network_for(cfg, feature_source, device)
    del feature_source  # a separately loaded base model lives on only as the features' frozen copy
    policy.eval()
    with Progress(len(indices), description=description, console=console) as bar:
        if structured:
            run = _run_structured(
                cfg, rows, indices, tokenizer, policy, features, amp_dtype, bar, execute=execute, timeout=exec_timeout
            )
        else:
            run = _run_strided(cfg, rows.select(indices), indices, tokenizer, policy, features, amp_dtype, bar)

    info = {
        "model": {
            "base_model": cfg.base_model,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "kind": kind,
        },
        "data": {"source": source, **run.data},
        "settings": {**run.settings, "seed": cfg.seed},
        "seconds": time.perf_counter() - started,
    }
    if run.execution is not None:
        info["execution"] = run.execution
    if run.notes:
        info["notes"] = run.notes
    return EvalResult(metrics=run.metrics, documents=run.documents, info=info)


def _run_strided(cfg, rows, indices, tokenizer, policy, features, amp_dtype, bar) -> _Run:
    from ebft.data.collate import collate_documents
    from ebft.strided.step import StridedSettings, document_generators

    device = next(policy.parameters()).device
    settings = StridedSettings.from_config(cfg.ebft)
    totals = _new_sums()
    documents: list[dict] = []
    size = cfg.micro_batch_size
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

    notes = []
    if settings.n_samples_per_prompt < 2:
        notes.append("n_samples_per_prompt is 1: the unbiased CFM estimate needs 2 samples per block")
    return _Run(
        metrics=eval_metrics.summarise(totals),
        documents=documents,
        data={
            "documents": len(rows),
            "blocks": int(totals["blocks"]),
            "tokens": int(totals["tokens"]),
            "answer_tokens": int(totals["answer_tokens"]),
        },
        settings={
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
        },
        notes=notes,
    )


STRUCTURED_NOTE = (
    "structured rows: alignment, diversity and reward are per completion, best-of-n and cfm_loss per prompt "
    "(over its num_generations completions); ce_loss covers every token of prompt + ground truth (the whole "
    "conversation on multi-turn rows), answer_ce_loss the ground-truth tokens the policy would write (+ EOS on "
    "single-turn rows, the assistant turns on multi-turn rows); completion_length counts the tokens after the "
    "prompt, stop token included (on multi-turn rows the rest of the rolled-out conversation)"
)


def _run_structured(cfg, rows, indices, tokenizer, policy, features, amp_dtype, bar, *, execute, timeout) -> _Run:
    from ebft.structured.hf import HFGenerate
    from ebft.structured.step import StructuredSettings, mix_seed, roll_out

    s = StructuredSettings.from_config(cfg, tokenizer.eos_token_id)
    G = s.num_generations
    notes = [STRUCTURED_NOTE]
    if cfg.trl.use_vllm:
        notes.append("trl.use_vllm is set, but evaluation samples with transformers generate on this machine")
        log.info(notes[-1])
    backend = HFGenerate(policy, sampling=s.sampling, pad_token_id=tokenizer.pad_token_id, autocast_dtype=amp_dtype)
    totals = dict.fromkeys((*eval_metrics.SUM_KEYS, *STRUCTURED_SUM_KEYS), 0.0)
    documents: list[dict] = []
    executions: list[RowExecution] = []
    size = max(1, cfg.micro_batch_size // G)  # micro_batch_size counts completions in structured mode
    for start in range(0, len(indices), size):
        chunk = indices[start : start + size]
        batch = [rows[i] for i in chunk]
        # Seeds keyed by the row's place in the held-out set (generation -1 is never a training step), so
        # two models, and any --max-docs subsets, sample a row with the same seed.
        seeds = [mix_seed(cfg.seed, -1, i) for i in chunk]
        samples = roll_out(backend, batch, s, tokenizer, seeds)
        per_row = score_prompts(policy, features, batch, samples, s, tokenizer, autocast_dtype=amp_dtype)
        for p, (index, row, sums) in enumerate(zip(chunk, batch, per_row, strict=True)):
            for key, value in sums.items():
                totals[key] += value
            record = {
                "index": index,
                "prompt_tokens": len(row.prompt_ids),
                "ground_truth_tokens": len(row.gt_ids),
                **summarise_structured(sums),
            }
            if execute and row.tests:
                texts = [q.text for q in samples[p * G : (p + 1) * G]]
                result = run_row_tests(texts, row.ground_truth, row.tests, timeout=timeout)
                executions.append(result)
                record.update(tests=len(row.tests), **result.record())
            documents.append(record)
        bar.advance(len(chunk))

    metrics = summarise_structured(totals)
    execution = None
    if execute:
        pass_rates, execution = execution_metrics(executions)
        metrics.update(pass_rates)
        execution["timeout_s"] = timeout
    return _Run(
        metrics=metrics,
        documents=documents,
        data={
            "prompts": len(indices),
            "completions": len(indices) * G,
            "tokens": int(totals["tokens"]),
            "answer_tokens": int(totals["answer_tokens"]),
        },
        settings={
            "num_generations": G,
            "rollout_backend": "transformers generate",
            "max_completion_length": s.max_completion_length,
            "adaptive_max_tokens": s.adaptive_max_tokens,
            "gt_length_multiplier": s.gt_length_multiplier,
            "temperature": s.sampling.temperature,
            "top_p": s.sampling.top_p,
            "top_k": s.sampling.top_k,
            "min_p": s.sampling.min_p,
            "repetition_penalty": s.sampling.repetition_penalty,
            "feature_layers": list(cfg.ebft.feature_layers),
            "embed_method": s.embed_method,
            "feature_norm": s.feature_norm,
            "use_whitening": s.use_whitening,
            "whitening_space": s.whitening_space,
            "alignment_coef": s.alignment_coef,
            "diversity_coef": s.diversity_coef,
        },
        notes=notes,
        execution=execution,
    )


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
    if "prompts" in data:
        caption = f"{data['prompts']} prompts, {data.get('completions', 0)} completions"
    else:
        caption = f"{data.get('documents', 0)} documents, {data.get('blocks', 0)} blocks"
    caption += f", {data.get('tokens', 0)} tokens; {data.get('source', '')}"
    execution = result.info.get("execution")
    if execution is not None:
        caption += (
            f"\nunit tests of {execution['rows_with_tests']} rows: completions "
            f"{_status_counts(execution['completions'])}; ground truth {_status_counts(execution['ground_truth'])}"
        )
    table = Table(title=f"ebft evaluate: {title}", caption=caption)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("better")
    for key, label, better in METRICS:
        table.add_row(label, format_value(result.metrics.get(key)), better)
    for key, label, better in EXTRA_METRICS:
        if key in result.metrics:
            table.add_row(label, format_value(result.metrics[key]), better)
    (console or get_console()).print(table)


def _status_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {status}" for status, count in counts.items())

"""Structured evaluation: ``trl.num_generations`` completions per held-out prompt row (multi-turn rows
turn by turn), scored per prompt; CE on the ground truth; optionally the rows' unit tests (``execute``)."""

from __future__ import annotations

import dataclasses
import logging

import torch

from ebft.config import TrainConfig
from ebft.evaluate import metrics as eval_metrics
from ebft.evaluate.execute import RowExecution, execution_metrics, run_row_tests
from ebft.evaluate.result import ModeRun
from ebft.rewards import reward_terms_for
from ebft.structured.hf import HFGenerate
from ebft.structured.rollout import mix_seed
from ebft.structured.scoring import FEATURE_BATCH, duplicate_samples, embed_pairs
from ebft.structured.settings import StructuredSettings
from ebft.structured.step import ce_sequences, policy_logprobs, roll_out

log = logging.getLogger("ebft")


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

    s, P, G = settings, len(rows), settings.num_generations
    pad = tokenizer.pad_token_id
    # Both sides as training scores them (``structured.scoring.score``): whole sequences through the frozen network.
    gen, gt = embed_pairs(features, rows, samples, s, pad, FEATURE_BATCH)
    same_as = duplicate_samples(samples, P, G).to(gen.device)
    scores = reward_terms_for(gen, gt, s, same_as)
    # The CFM identity needs unit-norm, unwhitened features; a and d do not depend on the coefficients.
    plain = (
        reward_terms_for(gen, gt, dataclasses.replace(s, use_whitening=False), same_as) if s.use_whitening else scores
    )
    cfm = eval_metrics.cfm_unbiased(plain.alignment, plain.diversity)  # [P]
    nll = _ground_truth_nll(policy, rows, tokenizer, s, autocast_dtype)

    out = []
    for p in range(P):
        a, r = scores.alignment[p], scores.reward[p]  # [G]
        token_nll, answer = nll[p]
        mine = samples[p * G : (p + 1) * G]
        sums = eval_metrics.new_sums()
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


STRUCTURED_NOTE = (
    "structured rows: alignment, diversity and reward are per completion, best-of-n and cfm_loss per prompt "
    "(over its num_generations completions); ce_loss covers every token of prompt + ground truth (the whole "
    "conversation on multi-turn rows), answer_ce_loss the ground-truth tokens the policy would write (+ EOS on "
    "single-turn rows, the assistant turns on multi-turn rows); completion_length counts the tokens after the "
    "prompt, stop token included (on multi-turn rows the rest of the rolled-out conversation)"
)


def sampler(cfg: TrainConfig, tokenizer, policy, amp_dtype) -> HFGenerate:
    """What evaluation samples completions with: transformers generate (or the shared-prefill decoder) on the
    policy's device, with the trl sampling settings, also when training samples from a vLLM server."""
    s = StructuredSettings.from_config(cfg, tokenizer.eos_token_id)
    if cfg.trl.use_vllm:
        log.info(VLLM_NOTE)
    return HFGenerate(policy, sampling=s.sampling, pad_token_id=tokenizer.pad_token_id, autocast_dtype=amp_dtype)


VLLM_NOTE = "trl.use_vllm is set, but evaluation samples with transformers generate on this machine"


def run_structured(
    cfg, rows, indices, tokenizer, policy, features, amp_dtype, bar, *, execute, timeout, backend=None
) -> ModeRun:
    """Score the prompt rows ``rows[i]`` for i in ``indices`` (their places in the held-out set, which key
    their seeds); ``backend``: a ``sampler`` made once for many calls (default: a new one)."""

    s = StructuredSettings.from_config(cfg, tokenizer.eos_token_id)
    G = s.num_generations
    notes = [STRUCTURED_NOTE, *([VLLM_NOTE] if cfg.trl.use_vllm else [])]
    backend = backend or sampler(cfg, tokenizer, policy, amp_dtype)
    totals = dict.fromkeys((*eval_metrics.SUM_KEYS, *STRUCTURED_SUM_KEYS), 0.0)
    documents: list[dict] = []
    executions: list[RowExecution] = []
    size = max(1, (cfg.eval_batch_size or cfg.micro_batch_size) // G)  # both count completions here
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
    return ModeRun(
        metrics=metrics,
        sums=totals,
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

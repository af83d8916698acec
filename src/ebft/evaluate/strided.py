"""Strided evaluation: rollouts exactly as in training on every held-out document, scored per block,
plus teacher-forced cross-entropy over all and over answer tokens."""

from __future__ import annotations

import dataclasses

import torch

from ebft.config import TrainConfig
from ebft.data.collate import collate_documents
from ebft.evaluate import metrics as eval_metrics
from ebft.evaluate.result import ModeRun
from ebft.losses import token_logprobs
from ebft.modeling.parts import backbone_of, output_head
from ebft.modeling.precision import autocast
from ebft.strided.step import StridedSettings, document_generators, roll_out, score_rollouts


@torch.no_grad()
def _token_ce(policy, batch, autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced NLL per target: (nll [D, L-1], all-token mask, answer-token mask)."""

    mask_all, mask_answer = eval_metrics.next_token_masks(batch.lengths, batch.labels, batch.prompt_length)
    with autocast:
        hidden = backbone_of(policy)(input_ids=batch.input_ids, use_cache=False).last_hidden_state  # [D, L, H]
        logp = token_logprobs(hidden[:, :-1][mask_all], batch.input_ids[:, 1:][mask_all], output_head(policy))
    nll = torch.zeros(mask_all.shape, device=hidden.device)
    nll[mask_all] = -logp.float()
    return nll, mask_all, mask_answer


@torch.no_grad()
def score_batch(policy, features, batch, settings, *, generators, autocast_dtype=None) -> list[dict[str, float]]:
    """Per-document sums (``eval_metrics.SUM_KEYS``) for one collated batch of documents."""

    device = batch.input_ids.device
    r = roll_out(policy, batch, settings, generators=generators, autocast_dtype=autocast_dtype)
    layout, packed, plan, positions = r.layout, r.packed, r.plan, r.positions
    hidden = features(packed, positions, plan)

    def reuse(*_args: object) -> list[torch.Tensor]:  # one feature pass serves both scorings below
        return hidden

    scores = score_rollouts(reuse, packed, plan, positions, layout, batch.labels, settings)
    # The CFM identity needs unit-norm, unwhitened features; a and d do not depend on the coefficients.
    plain = scores
    if settings.use_whitening:
        plain = score_rollouts(
            reuse, packed, plan, positions, layout, batch.labels, dataclasses.replace(settings, use_whitening=False)
        )
    nll, mask_all, mask_answer = _token_ce(policy, batch, autocast(device, autocast_dtype))

    n = layout.n
    out = []
    for d in range(layout.num_docs):
        valid = layout.valid[d]  # [K]
        a = scores.alignment[d][:, valid].T  # [K_d, n]
        rew = scores.reward[d][:, valid].T
        sums = eval_metrics.new_sums()
        sums["samples"] = float(a.numel())
        sums["blocks"] = float(a.shape[0])
        sums["alignment"] = float(a.sum())
        sums["diversity"] = float(scores.diversity[d][:, valid].sum())
        sums["reward"] = float(rew.sum())
        sums["best_alignment"] = float(eval_metrics.best_of_n(a).sum())
        sums["best_reward"] = float(eval_metrics.best_of_n(rew).sum())
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


def run_strided(
    cfg: TrainConfig, rows, indices, tokenizer, policy, features, amp_dtype, bar, *, first: int = 0
) -> ModeRun:
    """Score the documents ``rows`` (``indices``: their places in the held-out set), which are the evaluated
    documents from place ``first`` on (a process's share of them during training)."""

    device = next(policy.parameters()).device
    settings = StridedSettings.from_config(cfg.ebft)
    totals = eval_metrics.new_sums()
    documents: list[dict] = []
    size = cfg.eval_batch_size or cfg.micro_batch_size
    for start in range(0, len(rows), size):
        chunk = [rows[i] for i in range(start, min(start + size, len(rows)))]
        batch = collate_documents(chunk, tokenizer.pad_token_id).to(device)
        # Sampling seeds are keyed by the document's place among the evaluated documents (step 0 is never a
        # training step), so two models, and any split of the documents over processes, get identically
        # seeded rollouts.
        generators = document_generators(cfg.seed, 0, first + start, len(chunk), device)
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
    return ModeRun(
        metrics=eval_metrics.summarise(totals),
        sums=totals,
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

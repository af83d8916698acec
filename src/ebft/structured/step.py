"""Structured EBFT: rollouts -> sequence features -> rewards -> group advantages -> policy loss (docs/design.md §6).

One *rollout batch* is P prompts x G completions on this process, sample s = p * G + j. It is rolled
out (:func:`roll_out`; multi-turn rows in ``multiturn``), scored once (``scoring.score``: feature
network, rewards, advantages) into a :class:`RolloutBuffer`, and then trained on in micro-batches of
completions (:func:`microbatch`), ``num_iterations`` optimizer steps in a row. Every loss is divided by
step-global counts (``LossNorm``), so summed micro-batch gradients do not depend on how the step is split.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ebft import losses
from ebft.data.structured import PromptRow
from ebft.modeling.parts import output_head
from ebft.structured.chat import conversation_tokens
from ebft.structured.forward import predicting_states, training_backend
from ebft.structured.multiturn import roll_out_conversations
from ebft.structured.rollout import Completion, RolloutBackend, Sample, loss_token_count, loss_views
from ebft.structured.scoring import Scores
from ebft.structured.settings import StructuredSettings, completion_cap
from ebft.structured.stats import StructuredStats
from ebft.train.distributed import Sharding

# ---------------------------------------------------------------------------------------------
# Rollouts


def _single_turn(row: PromptRow, c: Completion, s: StructuredSettings, tokenizer) -> Sample:
    stop = c.finished and len(c.ids) > 0 and c.ids[-1] in s.sampling.stop_token_ids
    content = list(c.ids[:-1] if stop else c.ids)
    trained = c.finished or not s.mask_truncated_completions
    sequence = list(row.prompt_ids) + list(c.ids)
    return Sample(
        sequence=sequence,
        prompt_length=len(row.prompt_ids),
        loss_mask=[False] * len(row.prompt_ids) + [trained] * len(c.ids),
        feature_length=len(row.prompt_ids) + len(content),
        finished=c.finished,
        text=tokenizer.decode(content, skip_special_tokens=True),
        # A masked completion has no loss tokens, so it keeps none of its log-probs.
        behaviour_logprobs=None if c.logprobs is None else (list(c.logprobs) if trained else []),
        generated_tokens=len(c.ids),
    )


def roll_out(
    backend: RolloutBackend, rows: list[PromptRow], s: StructuredSettings, tokenizer, seeds: list[int]
) -> list[Sample]:
    """``num_generations`` samples of every row, sample-major: index p * G + j. ``seeds[p]`` keys all of
    row p's randomness (first turn and, for multi-turn rows, every later turn of each sample)."""
    G = s.num_generations
    caps = [completion_cap(_first_turn_tokens(row, tokenizer), s) for row in rows]
    first = backend.generate([list(r.prompt_ids) for r in rows], G, caps, seeds)
    multi = roll_out_conversations(backend, rows, first, s, tokenizer, seeds)
    return [
        multi[p, j] if (p, j) in multi else _single_turn(row, first[p][j], s, tokenizer)
        for p, row in enumerate(rows)
        for j in range(G)
    ]


def _first_turn_tokens(row: PromptRow, tokenizer) -> int:
    if not row.remaining_turns:
        return len(row.gt_ids)
    return len(tokenizer(row.ground_truth, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Policy loss


def policy_logprobs(
    model: torch.nn.Module,
    samples: list[Sample],
    s: StructuredSettings,
    pad_id: int,
    *,
    autocast_dtype: torch.dtype | None = None,
    with_entropy: bool = False,
    packed: bool | None = None,
    share_prefixes: bool = True,
):
    """The policy's log-prob of every loss token of ``samples``, flattened sample by sample.

    Returns (logp [T], seq_index [T]) or, with ``with_entropy``, (logp, seq_index, entropy [T]).
    Token t is scored by the hidden state at t - 1, under the sampler's distribution (temperature,
    top-k, top-p, min-p). ``packed``: padding-free forward (``forward.predicting_states``); None: when exact;
    ``share_prefixes``: the packed row computes each common prefix (a prompt's samples) once.
    """
    views = [(i, seq, loss) for i, q in enumerate(samples) for seq, loss in loss_views(q)]
    states, targets, view = predicting_states(
        model,
        [(seq, loss) for _, seq, loss in views],
        pad_id,
        autocast_dtype=autocast_dtype,
        packed=packed,
        share_prefixes=share_prefixes,
    )
    owner = torch.tensor([i for i, _, _ in views], dtype=torch.long, device=view.device)[view]
    sm = s.sampling
    result = losses.token_logprobs(
        states,
        targets,
        output_head(model),
        temperature=s.logprob_temperature,
        top_p=sm.top_p,
        top_k=sm.top_k,
        min_p=sm.min_p,
        with_entropy=with_entropy,
    )
    if with_entropy:
        logp, entropy = result
        return logp, owner, entropy
    return result, owner


def ce_sequences(rows: list[PromptRow], tokenizer, s: StructuredSettings) -> list[Sample]:
    """Teacher-forced ground truths for the CE term: prompt + ground truth (+ EOS for single-turn),
    with the loss on ground-truth tokens the policy would have to produce (assistant turns only, each
    with the stop token that ends it)."""
    out = []
    eos = tokenizer.eos_token_id
    for r in rows:
        prompt = list(r.prompt_ids)
        if r.remaining_turns:
            conv = [*r.prompt, {"role": "assistant", "content": r.ground_truth}, *r.remaining_turns]
            flags = [m.get("role") == "assistant" for m in conv[len(r.prompt) :]]
            # The end-of-turn token after each reply is a target too, as EOS is on single-turn rows.
            tokens = conversation_tokens(
                tokenizer, conv, len(r.prompt), flags, s.chat_template_kwargs, end_of_turn=s.sampling.stop_token_ids
            )
            seq, mask = list(tokens.ids[: s.sequence_len]), list(tokens.generated_mask[: s.sequence_len])
            prompt = list(tokens.ids[: tokens.prompt_length])
        else:
            gt = list(r.gt_ids) + ([eos] if eos is not None else [])
            seq = (prompt + gt)[: s.sequence_len]
            mask = ([False] * len(prompt) + [True] * len(gt))[: s.sequence_len]
        out.append(Sample(seq, len(prompt), mask, len(seq), True, ""))
    return out


@dataclass
class RolloutBuffer:
    """A scored rollout batch on this process, reused for ``num_iterations`` optimizer steps.

    advantage: [N] one per completion; old_logprobs: per completion, the policy's log-probs of its loss
    tokens when the batch was made (only kept when it is reused, i.e. num_iterations > 1).
    """

    rows: list[PromptRow]
    samples: list[Sample]
    scores: Scores
    advantage: torch.Tensor
    generation: int
    old_logprobs: list[torch.Tensor] | None = None
    _references: list[Sample] | None = field(default=None, repr=False)

    def references(self, tokenizer, s: StructuredSettings) -> list[Sample]:
        """The rows' ``ce_sequences``, rendered once per batch however many steps reuse it."""
        if self._references is None:
            self._references = ce_sequences(self.rows, tokenizer, s)
        return self._references


def old_logprobs(model, samples: list[Sample], s: StructuredSettings, pad_id: int, batch_size: int, amp) -> list:
    """Per-sample log-probs of the loss tokens under the current weights (no gradient)."""
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            logp, seq = policy_logprobs(model, chunk, s, pad_id, autocast_dtype=amp)
            out += [logp[seq == i].detach().cpu() for i in range(len(chunk))]
    return out


def microbatch(
    model: torch.nn.Module,
    buffer: RolloutBuffer,
    indices: list[int],
    ce_rows: list[int],
    s: StructuredSettings,
    norm: losses.LossNorm,
    ce_tokens: int,
    tokenizer,
    *,
    pad_id: int,
    autocast_dtype: torch.dtype | None = None,
    sharding: Sharding | None = None,
) -> StructuredStats:
    """Loss of the completions ``indices`` of ``buffer`` (and CE of the prompts ``ce_rows``); runs
    backward and returns the micro-batch's statistics (its policy-loss fields; the rollout batch's are the
    runner's).

    Loss = rl_coef * aggregated clipped surrogate + ce_coef * CE (token mean over the step).
    ``sharding``: how the policy runs under FSDP (``ebft.train.distributed``); default unsharded.
    """
    sharding = sharding or Sharding(model)
    with training_backend(model):  # the packed forward's attention, also for backward's recomputation
        total, stats = _policy_gradient_term(buffer, indices, s, norm, pad_id, autocast_dtype, sharding)
        if s.ce_coef > 0 and ce_rows:
            ce, ce_sum = _ce_term(buffer, ce_rows, s, ce_tokens, tokenizer, pad_id, autocast_dtype, sharding)
            stats += StructuredStats(ce_sum=ce_sum)
            total = ce if total is None else total + ce
        if total is not None:
            total.backward()
            stats += StructuredStats(loss=float(total.detach()))
    return stats


def _policy_gradient_term(
    buffer: RolloutBuffer,
    indices: list[int],
    s: StructuredSettings,
    norm: losses.LossNorm,
    pad_id: int,
    autocast_dtype: torch.dtype | None,
    sharding: Sharding,
) -> tuple[torch.Tensor | None, StructuredStats]:
    """rl_coef x the aggregated clipped surrogate of the completions ``indices`` (None when skipped), and
    its statistics."""
    samples = [buffer.samples[i] for i in indices]
    adv = buffer.advantage[indices]
    skip_rl = s.rl_coef == 0 or not any(loss_token_count(q) for q in samples)
    skipped = StructuredStats()
    if s.skip_zero_advantage_batches and bool((adv == 0).all()):
        skip_rl = True
        skipped = StructuredStats(skipped_micro_batches=1.0)
    if skip_rl:
        if sharding.sharded and s.rl_coef != 0:
            # This process skips for reasons of its own data; under FSDP it still runs the pass (weight 0)
            # because the other processes' passes wait for its collectives.
            logp, _ = sharding.grad_pass(policy_logprobs, samples, s, pad_id, autocast_dtype=autocast_dtype)
            return 0.0 * logp.sum(), skipped
        return None, skipped
    logp, seq, entropy = sharding.grad_pass(
        policy_logprobs, samples, s, pad_id, autocast_dtype=autocast_dtype, with_entropy=True
    )
    if buffer.old_logprobs is not None:
        old = torch.cat([buffer.old_logprobs[i] for i in indices]).to(logp.device)
    else:
        old = logp.detach()
    weight, ratios = _importance_weights(samples, old, seq, s)
    token_adv = adv.to(logp.device)[seq]
    sur = losses.clipped_surrogate(logp, old, token_adv, eps_low=s.eps_low, eps_high=s.eps_high, weight=weight)
    rl = losses.aggregate(sur.loss, seq, len(samples), s.loss_type, norm)
    stats = ratios + StructuredStats(
        rl_loss=float(rl.detach()),
        rl_tokens=float(logp.numel()),
        entropy=float(entropy.sum()),
        clip_low=float(sur.low_clipped.sum()),
        clip_high=float(sur.high_clipped.sum()),
    )
    return s.rl_coef * rl, stats


def _importance_weights(
    samples: list[Sample], old: torch.Tensor, seq: torch.Tensor, s: StructuredSettings
) -> tuple[torch.Tensor | None, StructuredStats]:
    """Per-token weights ``[T]`` correcting for the sampler (None when there is nothing to correct), and the
    statistics of the raw ratios (``is_*``; zero, ``inf`` minimum, when no token has sampler log-probs).

    Off-policy correction for samples drawn by a stale or numerically different sampler (vLLM):
    w = pi_old / pi_behaviour per token, clamped to the trl importance-weight bounds [low, high]. Samples
    whose sampler log-probs are unknown (multi-turn replies, re-tokenised) keep weight 1.
    """
    reported = [q.behaviour_logprobs is not None for q in samples]
    if not (s.is_correction and any(reported)):
        return None, StructuredStats()
    covered = torch.tensor(reported, device=old.device)[seq]
    values = [v for q in samples if q.behaviour_logprobs is not None for v in q.behaviour_logprobs]
    behaviour = old.clone()
    behaviour[covered] = torch.tensor(values, device=old.device, dtype=old.dtype)
    raw = torch.exp(old - behaviour)
    stats = StructuredStats()
    if bool(covered.any()):
        stats = StructuredStats(
            is_ratio_sum=float(raw[covered].sum()),
            is_ratio_min=float(raw[covered].min()),
            is_tokens=float(covered.sum()),
        )
    return raw.clamp(*s.is_bounds), stats


def _ce_term(
    buffer: RolloutBuffer,
    ce_rows: list[int],
    s: StructuredSettings,
    ce_tokens: int,
    tokenizer,
    pad_id: int,
    autocast_dtype: torch.dtype | None,
    sharding: Sharding,
) -> tuple[torch.Tensor, float]:
    """ce_coef x the teacher-forced NLL of the prompts ``ce_rows``' ground truths, per step token; and the
    NLL summed (the ``ce_sum`` statistic)."""
    references = buffer.references(tokenizer, s)
    ce_samples = [references[p] for p in ce_rows]
    ce_logp, _ = sharding.grad_pass(policy_logprobs, ce_samples, _untempered(s), pad_id, autocast_dtype=autocast_dtype)
    ce = -ce_logp.sum() / max(ce_tokens, 1)
    return s.ce_coef * ce, float(-ce_logp.detach().sum())


def _untempered(s: StructuredSettings) -> StructuredSettings:
    """CE is the model's own next-token loss: no temperature, no truncation."""
    return replace(s, sampling=replace(s.sampling, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0))

"""Structured EBFT: rollouts -> sequence features -> rewards -> group advantages -> policy loss (DESIGN 6).

One *rollout batch* is P prompts x G completions on this process, sample s = p * G + j. It is scored
once (feature network, rewards, advantages) and then trained on in micro-batches of completions,
``num_iterations`` optimizer steps in a row. Every loss is divided by step-global counts
(``LossNorm``), so summed micro-batch gradients do not depend on how the step is split.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch

from ebft import features as feat
from ebft import losses, rewards
from ebft.data.structured import PromptRow
from ebft.distributed import Sharding
from ebft.models import FeatureNetwork, backbone_of
from ebft.structured.chat import conversation_tokens, render_prompt_ids
from ebft.structured.rollout import Completion, RolloutBackend, Sampling

# Adaptive max tokens never cuts a completion below this many tokens (or max_completion_length when
# that is smaller): a very short ground truth should not stop the policy from saying anything.
ADAPTIVE_FLOOR = 64


@dataclass(frozen=True)
class StructuredSettings:
    """The ``trl:`` and ``ebft:`` keys the structured step reads."""

    num_generations: int
    max_completion_length: int
    adaptive_max_tokens: bool
    gt_length_multiplier: float
    sampling: Sampling
    embed_method: str
    feature_norm: str
    use_whitening: bool
    whitening_space: str
    alignment_coef: float
    diversity_coef: float
    scale_rewards: str
    loss_type: str
    eps_low: float
    eps_high: float
    num_iterations: int
    mask_truncated_completions: bool
    skip_zero_advantage_batches: bool
    is_correction: bool
    is_cap: float
    rl_coef: float
    ce_coef: float
    sequence_len: int
    chat_template_kwargs: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg, eos_token_id: int | None) -> StructuredSettings:
        t, e = cfg.trl, cfg.ebft
        return cls(
            num_generations=t.num_generations,
            max_completion_length=t.max_completion_length,
            adaptive_max_tokens=e.adaptive_max_tokens,
            gt_length_multiplier=e.gt_length_multiplier,
            sampling=Sampling.from_trl(t, eos_token_id),
            embed_method=e.embed_method,
            feature_norm=e.feature_norm,
            use_whitening=e.use_whitening,
            whitening_space=e.whitening_space,
            alignment_coef=e.alignment_coef,
            diversity_coef=e.diversity_coef,
            scale_rewards=t.scale_rewards,
            loss_type=t.loss_type,
            eps_low=t.epsilon,
            eps_high=t.clip_high,
            num_iterations=t.num_iterations,
            mask_truncated_completions=t.mask_truncated_completions,
            skip_zero_advantage_batches=t.skip_zero_advantage_batches,
            is_correction=t.use_vllm and t.vllm_importance_sampling_correction,
            is_cap=t.vllm_importance_sampling_cap,
            rl_coef=e.rl_coef,
            ce_coef=e.ce_coef,
            sequence_len=cfg.sequence_len,
            chat_template_kwargs=dict(t.chat_template_kwargs or {}),
        )

    @property
    def logprob_temperature(self) -> float:
        # Greedy decoding has no tempered density; the untempered policy is scored instead.
        return self.sampling.temperature if self.sampling.temperature > 0 else 1.0


def completion_cap(gt_tokens: int, s: StructuredSettings) -> int:
    """Token budget of one completion: ``max_completion_length``, or with ``adaptive_max_tokens``
    ceil(gt_length_multiplier x ground-truth tokens), at least min(64, max_completion_length)."""
    if not s.adaptive_max_tokens:
        return s.max_completion_length
    wanted = max(math.ceil(s.gt_length_multiplier * gt_tokens), ADAPTIVE_FLOOR)
    return min(s.max_completion_length, wanted)


# ---------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Sample:
    """One completion (single-turn) or one rolled-out conversation (multi-turn), as token ids.

    sequence: prompt + everything after it; prompt_length: where the prompt ends; loss_mask: one bool
    per token, True on tokens the policy generated (the policy-gradient targets); feature_length: the
    tokens the feature network pools over (single-turn: without the trailing stop token, which the
    ground truth does not have); behaviour_logprobs: the sampler's log-prob of each loss token in
    order, when the backend reported them; text: the completion, decoded, for logs;
    generated_tokens: how many tokens the policy wrote (multi-turn: its replies, not the user turns);
    turns (multi-turn): every reply as (the context ids it was generated from, its ids), exactly as
    sampled. The policy loss is taken on these, not on the re-rendered conversation, whose tokens can
    differ from the sampled ones (a chat template re-renders history, decoding and re-encoding is not
    always the identity); ``trained`` is False for a sample excluded from the loss.
    """

    sequence: list[int]
    prompt_length: int
    loss_mask: list[bool]
    feature_length: int
    finished: bool
    text: str
    behaviour_logprobs: list[float] | None = None
    generated_tokens: int = 0
    turns: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()
    trained: bool = True


def loss_views(q: Sample) -> list[tuple[list[int], list[bool]]]:
    """The token sequences the policy loss reads for ``q`` and, per token, whether it is a loss target.

    A single-turn sample is one view (its sequence and loss mask); a multi-turn sample is one view per
    reply, the reply after the exact context it was sampled from, so every loss token is scored in the
    context that produced it.
    """
    if not q.turns:
        return [(q.sequence, q.loss_mask)]
    return [(list(ctx) + list(reply), [False] * len(ctx) + [q.trained] * len(reply)) for ctx, reply in q.turns]


def loss_token_count(q: Sample) -> int:
    """Loss tokens of ``q`` (a view's first token has nothing to predict it)."""
    return sum(sum(mask[1:]) for _, mask in loss_views(q))


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


def _content(c: Completion, s: StructuredSettings, tokenizer) -> str:
    ids = [t for t in c.ids if t not in s.sampling.stop_token_ids]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _multi_turn(
    backend: RolloutBackend,
    rows: list[PromptRow],
    first: list[list[Completion]],
    s: StructuredSettings,
    tokenizer,
    seeds: list[int],
) -> dict[tuple[int, int], Sample]:
    """Roll out every sample of every multi-turn row to the end of its own conversation.

    Each sample keeps its own message list: the ground-truth user (or tool/system) messages of the row
    are appended as they come, and every ground-truth assistant message is replaced by the policy's
    reply to *that sample's* conversation so far. Keys are (prompt index, sample index), so samples of
    different prompts in one batch never mix.
    """
    G = s.num_generations
    convs: dict[tuple[int, int], list[dict]] = {}
    generated: dict[tuple[int, int], list[bool]] = {}
    finished: dict[tuple[int, int], bool] = {}
    pending: dict[tuple[int, int], list[dict]] = {}
    turns: dict[tuple[int, int], list[tuple[tuple[int, ...], Completion]]] = {}
    for p, row in enumerate(rows):
        if not row.remaining_turns:
            continue
        for j in range(G):
            c = first[p][j]
            convs[p, j] = [*row.prompt, {"role": "assistant", "content": _content(c, s, tokenizer)}]
            generated[p, j] = [True]
            finished[p, j] = c.finished
            pending[p, j] = list(row.remaining_turns)
            turns[p, j] = [(tuple(row.prompt_ids), c)]
    turn = 0
    while True:
        waiting, contexts, caps, turn_seeds = [], [], [], []
        for key, todo in pending.items():
            while todo and todo[0].get("role") != "assistant":
                convs[key].append(dict(todo.pop(0)))
                generated[key].append(False)
            if todo:
                target = todo.pop(0)
                context = render_prompt_ids(tokenizer, convs[key], s.chat_template_kwargs)
                # The sample is cut at sequence_len: a reply gets at most the room left before it.
                room = s.sequence_len - len(context)
                if room <= 0:
                    # Nothing from here on is kept: end the conversation with an empty reply (its header is
                    # part of the context the sample is cut in) and generate nothing; the sample is truncated.
                    convs[key].append({"role": "assistant", "content": ""})
                    generated[key].append(True)
                    finished[key] = False
                    todo.clear()
                    continue
                waiting.append(key)
                contexts.append(context)
                gt_len = len(tokenizer(target.get("content", ""), add_special_tokens=False)["input_ids"])
                caps.append(min(completion_cap(gt_len, s), room))
                turn_seeds.append(mix_seed(seeds[key[0]], key[1], turn + 1))
        if not waiting:
            break
        turn += 1
        replies = backend.generate(contexts, 1, caps, turn_seeds)
        for key, context, reply in zip(waiting, contexts, replies, strict=True):
            turns[key].append((tuple(context), reply[0]))
            convs[key].append({"role": "assistant", "content": _content(reply[0], s, tokenizer)})
            generated[key].append(True)
            finished[key] = finished[key] and reply[0].finished

    out = {}
    for key, conv in convs.items():
        row = rows[key[0]]
        tokens = conversation_tokens(tokenizer, conv, len(row.prompt), generated[key], s.chat_template_kwargs)
        ids, mask = tokens.ids[: s.sequence_len], tokens.generated_mask[: s.sequence_len]
        trained = finished[key] or not s.mask_truncated_completions
        behaviour = None
        if all(c.logprobs is not None for _, c in turns[key]):
            # The sampler's log-probs line up with the replies' ids, the loss tokens of the turn views.
            behaviour = [v for _, c in turns[key] for v in c.logprobs] if trained else []
        out[key] = Sample(
            sequence=list(ids),
            prompt_length=tokens.prompt_length,
            loss_mask=[m and trained for m in mask],
            feature_length=len(ids),
            finished=finished[key],
            text=tokenizer.decode(ids[tokens.prompt_length :], skip_special_tokens=False),
            behaviour_logprobs=behaviour,
            generated_tokens=sum(len(c.ids) for _, c in turns[key]),
            turns=tuple((context, tuple(c.ids)) for context, c in turns[key]),
            trained=trained,
        )
    return out


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, generation, prompt position, ...); stable across runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def roll_out(
    backend: RolloutBackend, rows: list[PromptRow], s: StructuredSettings, tokenizer, seeds: list[int]
) -> list[Sample]:
    """``num_generations`` samples of every row, sample-major: index p * G + j. ``seeds[p]`` keys all of
    row p's randomness (first turn and, for multi-turn rows, every later turn of each sample)."""
    G = s.num_generations
    caps = [completion_cap(_first_turn_tokens(row, tokenizer), s) for row in rows]
    first = backend.generate([list(r.prompt_ids) for r in rows], G, caps, seeds)
    multi = _multi_turn(backend, rows, first, s, tokenizer, seeds)
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
# Scoring


@dataclass
class Scores:
    """Reward terms of P groups of G completions (float32).

    alignment, diversity, reward, advantage: ``[P, G]``; cfm: ``[P]``.
    """

    alignment: torch.Tensor
    diversity: torch.Tensor
    reward: torch.Tensor
    advantage: torch.Tensor
    cfm: torch.Tensor


def _right_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] ids padded on the right, and [B] lengths. Causal attention never lets a real token see
    the padding after it, so no attention mask is needed."""
    width = max(1, max(len(q) for q in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, q in enumerate(seqs):
        ids[i, : len(q)] = torch.tensor(q, dtype=torch.long)
    return ids, torch.tensor([len(q) for q in seqs])


def embed(
    features: FeatureNetwork,
    seqs: list[list[int]],
    prompt_lengths: list[int],
    s: StructuredSettings,
    pad_id: int,
    batch_size: int,
) -> torch.Tensor:
    """Pooled features of whole sequences: N token lists -> [N, E] (float32, on the features' device)."""
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids, lengths = _right_padded(chunk, pad_id)
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        hidden = features(ids, positions)  # per layer [B, S, H]
        tokens = feat.combine_layers(hidden, s.feature_norm)  # [B, S, E]
        col = torch.arange(ids.shape[1], device=tokens.device)
        valid = col < lengths.to(tokens.device)[:, None]
        prompt = torch.tensor(prompt_lengths[start : start + batch_size], device=tokens.device)
        out.append(feat.pool(tokens, valid, s.embed_method, col >= prompt[:, None]))
    return torch.cat(out)


def embed_pairs(
    features: FeatureNetwork,
    rows: list[PromptRow],
    samples: list[Sample],
    s: StructuredSettings,
    pad_id: int,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of both sides, whole sequences through the frozen network: prompt + completion
    (or the rolled-out conversation) -> gen ``[P, G, E]``, prompt + ground truth (the ground-truth
    conversation) -> gt ``[P, E]``. ``samples`` in ``roll_out`` order."""
    gen = embed(
        features,
        [q.sequence[: q.feature_length] for q in samples],
        [q.prompt_length for q in samples],
        s,
        pad_id,
        batch_size,
    )
    gt = embed(
        features,
        [list(r.prompt_ids) + list(r.gt_ids) for r in rows],
        [len(r.prompt_ids) for r in rows],
        s,
        pad_id,
        batch_size,
    )
    return gen.reshape(len(rows), s.num_generations, -1), gt


def score(
    features: FeatureNetwork,
    rows: list[PromptRow],
    samples: list[Sample],
    s: StructuredSettings,
    pad_id: int,
    *,
    batch_size: int,
    batch_std: Callable[[torch.Tensor], float] | None = None,
) -> Scores:
    """Feature-matching rewards (paper eq. 7) and group advantages of every completion.

    Both sides are embedded by ``embed_pairs``. ``batch_std`` maps this
    process's rewards to the standard deviation over the whole rollout batch (all processes); it is
    needed for ``scale_rewards: batch`` only.
    """
    gen, gt = embed_pairs(features, rows, samples, s, pad_id, batch_size)
    terms = rewards.reward_terms(
        gen,
        gt,
        alignment_coef=s.alignment_coef,
        diversity_coef=s.diversity_coef,
        use_whitening=s.use_whitening,
        whitening_space=s.whitening_space,
    )
    spread = batch_std(terms.reward) if s.scale_rewards == "batch" else None
    adv = rewards.group_advantages(terms.reward, s.scale_rewards, spread)
    return Scores(terms.alignment, terms.diversity, terms.reward, adv, terms.cfm)


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
):
    """The policy's log-prob of every loss token of ``samples``, flattened sample by sample.

    Returns (logp [T], seq_index [T]) or, with ``with_entropy``, (logp, seq_index, entropy [T]).
    Token t is scored by the hidden state at t - 1, under the sampler's distribution (temperature,
    top-k, top-p, min-p).
    """
    device = next(model.parameters()).device
    views = [(i, seq, loss) for i, q in enumerate(samples) for seq, loss in loss_views(q)]
    ids, _ = _right_padded([seq for _, seq, _ in views], pad_id)
    width = ids.shape[1]
    mask = torch.zeros(len(views), width, dtype=torch.bool)
    for v, (_, _, loss) in enumerate(views):
        mask[v, : len(loss)] = torch.tensor(loss, dtype=torch.bool)
    mask[:, 0] = False  # nothing predicts the first token
    owner = torch.tensor([i for i, _, _ in views], device=device)
    ids, mask = ids.to(device), mask.to(device)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with amp:
        positions = torch.arange(width, device=device).expand_as(ids)
        hidden = backbone_of(model)(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: view by view (sample by sample), tokens in order
    sm = s.sampling
    result = losses.token_logprobs(
        hidden[rows, cols - 1],
        ids[rows, cols],
        model.get_output_embeddings(),
        temperature=s.logprob_temperature,
        top_p=sm.top_p,
        top_k=sm.top_k,
        min_p=sm.min_p,
        with_entropy=with_entropy,
    )
    if with_entropy:
        logp, entropy = result
        return logp, owner[rows], entropy
    return result, owner[rows]


def ce_sequences(rows: list[PromptRow], tokenizer, s: StructuredSettings) -> list[Sample]:
    """Teacher-forced ground truths for the CE term: prompt + ground truth (+ EOS for single-turn),
    with the loss on ground-truth tokens the policy would have to produce (assistant turns only)."""
    out = []
    eos = tokenizer.eos_token_id
    for r in rows:
        prompt = list(r.prompt_ids)
        if r.remaining_turns:
            conv = [*r.prompt, {"role": "assistant", "content": r.ground_truth}, *r.remaining_turns]
            flags = [m.get("role") == "assistant" for m in conv[len(r.prompt) :]]
            tokens = conversation_tokens(tokenizer, conv, len(r.prompt), flags, s.chat_template_kwargs)
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

    def state_dict(self) -> dict:
        return {
            "rows": self.rows,
            "samples": self.samples,
            "scores": self.scores,
            "advantage": self.advantage,
            "generation": self.generation,
            "old_logprobs": self.old_logprobs,
        }


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
) -> dict[str, float]:
    """Loss of the completions ``indices`` of ``buffer`` (and CE of the prompts ``ce_rows``); runs
    backward and returns summed quantities for the step's metrics.

    Loss = rl_coef * aggregated clipped surrogate + ce_coef * CE (token mean over the step).
    ``sharding``: how the policy runs under FSDP (``ebft.distributed``); default unsharded.
    """
    sharding = sharding or Sharding(model)
    sums: dict[str, float] = {}
    samples = [buffer.samples[i] for i in indices]
    adv = buffer.advantage[indices]
    total = None
    skip_rl = s.rl_coef == 0 or not any(loss_token_count(q) for q in samples)
    if s.skip_zero_advantage_batches and bool((adv == 0).all()):
        skip_rl = True
        sums["skipped_micro_batches"] = 1.0
    if skip_rl and sharding.sharded and s.rl_coef != 0:
        # This process skips for reasons of its own data; under FSDP it still runs the pass (weight 0)
        # because the other processes' passes wait for its collectives.
        logp, _ = sharding.grad_pass(policy_logprobs, samples, s, pad_id, autocast_dtype=autocast_dtype)
        total = 0.0 * logp.sum()
    if not skip_rl:
        logp, seq, entropy = sharding.grad_pass(
            policy_logprobs, samples, s, pad_id, autocast_dtype=autocast_dtype, with_entropy=True
        )
        if buffer.old_logprobs is not None:
            old = torch.cat([buffer.old_logprobs[i] for i in indices]).to(logp.device)
        else:
            old = logp.detach()
        weight = None
        reported = [q.behaviour_logprobs is not None for q in samples]
        if s.is_correction and any(reported):
            # Off-policy correction for samples drawn by a stale or numerically different sampler
            # (vLLM): w = pi_old / pi_behaviour per token, clamped to [1/cap, cap] both ways. Samples whose
            # sampler log-probs are unknown (multi-turn replies, re-tokenised) keep weight 1.
            covered = torch.tensor(reported, device=logp.device)[seq]
            values = [v for q in samples if q.behaviour_logprobs is not None for v in q.behaviour_logprobs]
            behaviour = old.clone()
            behaviour[covered] = torch.tensor(values, device=logp.device, dtype=old.dtype)
            raw = torch.exp(old - behaviour)
            weight = raw.clamp(1.0 / s.is_cap, s.is_cap)
            if bool(covered.any()):
                sums["is_ratio_sum"] = float(raw[covered].sum())
                sums["is_ratio_min"] = float(raw[covered].min())
                sums["is_tokens"] = float(covered.sum())
        token_adv = adv.to(logp.device)[seq]
        sur = losses.clipped_surrogate(logp, old, token_adv, eps_low=s.eps_low, eps_high=s.eps_high, weight=weight)
        rl = losses.aggregate(sur.loss, seq, len(samples), s.loss_type, norm)
        total = s.rl_coef * rl
        sums.update(
            rl_loss=float(rl.detach()),
            rl_tokens=float(logp.numel()),
            entropy=float(entropy.sum()),
            clip_low=float(sur.low_clipped.sum()),
            clip_high=float(sur.high_clipped.sum()),
        )
    if s.ce_coef > 0 and ce_rows:
        references = buffer.references(tokenizer, s)
        ce_samples = [references[p] for p in ce_rows]
        ce_logp, _ = sharding.grad_pass(
            policy_logprobs, ce_samples, _untempered(s), pad_id, autocast_dtype=autocast_dtype
        )
        ce = -ce_logp.sum() / max(ce_tokens, 1)
        total = s.ce_coef * ce if total is None else total + s.ce_coef * ce
        sums["ce_sum"] = float(-ce_logp.detach().sum())
    if total is not None:
        total.backward()
        sums["loss"] = float(total.detach())
    return sums


def _untempered(s: StructuredSettings) -> StructuredSettings:
    """CE is the model's own next-token loss: no temperature, no truncation."""
    return replace(s, sampling=replace(s.sampling, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0))

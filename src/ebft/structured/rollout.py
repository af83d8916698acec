"""Structured rollouts: how completions are drawn (:class:`Sampling`), what a backend returns
(:class:`Completion`, :class:`RolloutBackend`), and what training keeps of each rollout (:class:`Sample`,
the token views its policy loss reads, and how rollout randomness is keyed: :func:`mix_seed`).

A backend turns P prompts (token ids, already rendered with the chat template) into ``n`` completions
each: ``HFGenerate`` (transformers ``generate`` on the training device, the default) or a vLLM server
(``ebft.vllm``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn (the ``trl:`` sampling keys). 0 disables top_k and min_p."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_trl(cls, trl, eos_token_id: int | None) -> Sampling:
        stops = list(trl.generation_kwargs.stop_token_ids or [])
        if eos_token_id is not None and eos_token_id not in stops:
            stops.append(eos_token_id)
        return cls(
            temperature=trl.temperature,
            top_p=trl.top_p,
            top_k=trl.top_k or 0,
            min_p=trl.min_p or 0.0,
            repetition_penalty=trl.repetition_penalty,
            stop_token_ids=tuple(stops),
        )


@dataclass(frozen=True)
class Completion:
    """One sampled completion.

    ids: the generated tokens, ending with the stop token when one was produced.
    finished: True when a stop token ended it, False when it hit its length cap.
    logprobs: the sampler's log-probability of each token in ``ids`` (behaviour policy, after
    temperature and truncation) when the backend reports them (vLLM); None otherwise.
    """

    ids: tuple[int, ...]
    finished: bool
    logprobs: tuple[float, ...] | None = None


class RolloutBackend(Protocol):
    def generate(
        self, prompts: list[list[int]], n: int, max_tokens: list[int], seeds: list[int]
    ) -> list[list[Completion]]:
        """``n`` completions of each prompt; prompt i gets at most ``max_tokens[i]`` new tokens.

        Returns P lists of n completions, in prompt order. Prompt i's completions must depend only on
        the prompt, its cap, the weights and ``seeds[i]`` (not on the other prompts of the call), so a
        run gives the same rollouts however its prompts are split across micro-batches and processes.
        """
        ...

    def sync(self, model, step: int) -> None:
        """Make the backend generate with ``model``'s current weights (after optimizer step ``step``)."""
        ...

    def close(self) -> None: ...


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


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, generation, prompt position, ...); stable across runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def right_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] ids padded on the right, and [B] lengths. Causal attention never lets a real token see
    the padding after it, so no attention mask is needed."""
    width = max(1, max(len(q) for q in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, q in enumerate(seqs):
        ids[i, : len(q)] = torch.tensor(q, dtype=torch.long)
    return ids, torch.tensor([len(q) for q in seqs])

"""Rollout backends for structured mode: full completions of tokenised prompts (DESIGN 6).

A backend turns P prompts (token ids, already rendered with the chat template) into ``n`` completions
each. Two implementations: ``HFGenerate`` (transformers ``generate`` on the training device, the
default) and ``ebft.structured.vllm.VLLMBackend`` (an OpenAI-compatible vLLM server).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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

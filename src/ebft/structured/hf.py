"""Rollouts with transformers ``generate`` on the training device (the default backend)."""

from __future__ import annotations

import logging

import torch

from ebft.modeling.merged_adapters import merge_reason, merged_for_sampling
from ebft.modeling.precision import autocast
from ebft.sampling import truncation_keep
from ebft.structured import decode
from ebft.structured.rollout import Completion, Sampling

log = logging.getLogger("ebft")


def cut_completion(tokens: list[int], stop_ids: tuple[int, ...], cap: int) -> Completion:
    """The completion in ``tokens`` (generated ids, maybe padded): up to and including the first stop
    token, at most ``cap`` tokens. ``finished`` is True only when a stop token ended it within the cap."""
    for i, token in enumerate(tokens[:cap]):
        if token in stop_ids:
            return Completion(ids=tuple(tokens[: i + 1]), finished=True)
    return Completion(ids=tuple(tokens[:cap]), finished=False)


class SeededSampler:
    """A transformers logits processor that draws every row from its own random stream.

    With ``do_sample=False`` transformers takes the argmax of the processed scores; returning
    tempered, truncated logits plus Gumbel noise makes that argmax an exact draw from the sampling
    distribution (Gumbel-max). The noise of row r comes from ``generators[r]`` alone, so a row's tokens
    depend only on its prompt, its seed and the weights, never on the other rows of the batch. The
    truncation is ``truncation_keep``, the very function the trainer's log-probs use.
    """

    def __init__(self, sampling: Sampling, generators: list[torch.Generator]):
        self.sampling = sampling
        self.generators = generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        z = scores.float() / s.temperature
        # Diverged weights (NaN logits): draw uniformly so the step completes; its loss is then non-finite
        # too and the trainer skips the update.
        z = torch.where(torch.isnan(z).any(-1, keepdim=True), torch.zeros_like(z), z)
        z = z.masked_fill(~truncation_keep(z, s.top_p, s.top_k, s.min_p), float("-inf"))
        u = torch.stack([torch.rand(z.shape[-1], generator=g, device=z.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))
        return z + gumbel


def _generators(seeds: list[int], n: int, device) -> list[torch.Generator]:
    """Sample j of the prompt with seed ``seed`` draws from its own stream, row ``p * n + j``."""
    out = []
    for seed in seeds:
        for j in range(n):
            gen = torch.Generator(device=device)
            gen.manual_seed((seed * 1_000_003 + j) % 2**63)
            out.append(gen)
    return out


class HFGenerate:
    """``model.generate`` for many prompts at once: left padding, ``n`` samples per prompt, stop token
    ids, repetition penalty, and the trl sampling settings through ``SeededSampler`` (per-sample random
    streams keyed by the prompt's seed, so batching never changes a prompt's completions). Each call
    generates up to the largest cap of its prompts and cuts every completion at its own prompt's cap:
    for autoregressive sampling that is the same distribution as generating each with its own limit.
    Where ``decode.generate_reason`` finds nothing against it (no repetition penalty, no logit-changing
    generation config, a cache it can repeat and shrink) the same draws come from
    ``decode.shared_prefill_generate`` instead: one prefill per prompt, finished rows leave the batch. The
    choice is made once, here, and logged. Log-probs are not reported; the trainer scores completions with
    the policy itself (the sampler *is* the policy here).
    """

    def __init__(
        self,
        model,
        *,
        sampling: Sampling,
        pad_token_id: int,
        rows_per_call: int = 64,
        autocast_dtype: torch.dtype | None = None,
        shared_prefill: bool = True,
    ):
        self.model = model
        # One prefill per prompt and finished rows leaving the batch (``decode``), wherever that loop
        # reproduces generate's draws; shared_prefill=False: transformers generate always.
        reason = decode.generate_reason(model, sampling) if shared_prefill else "shared_prefill=False"
        self.shared_prefill = reason is None
        if reason is None:
            log.info("rollouts: shared-prefill decoder (one prefill per prompt, finished rows leave the batch)")
        else:
            log.info("rollouts: transformers generate, because of %s", reason)
        self.sampling = sampling
        self.pad_token_id = pad_token_id
        self.rows_per_call = rows_per_call
        # The precision the trainer scores completions in (bf16 autocast where configured), so that the
        # sampler and the scored policy agree as closely as the arithmetic allows.
        self.autocast_dtype = autocast_dtype
        merge = merge_reason(model, autocast_dtype)
        if merge is None:
            log.info("rollouts: LoRA merged into a copy of the adapted weights while sampling")
        elif hasattr(model, "peft_config"):
            log.info("rollouts: adapters applied unmerged while sampling, because of %s", merge)

    def generate(
        self, prompts: list[list[int]], n: int, max_tokens: list[int], seeds: list[int]
    ) -> list[list[Completion]]:
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out: list[list[Completion]] = []
        step = max(1, self.rows_per_call // n)
        amp = autocast(device, self.autocast_dtype)
        try:
            with torch.no_grad(), amp, merged_for_sampling(self.model, self.autocast_dtype):
                for start in range(0, len(prompts), step):
                    end = start + step
                    out += self._generate(prompts[start:end], n, max_tokens[start:end], seeds[start:end], device)
        finally:
            self.model.train(was_training)
        return out

    def _generate(self, prompts, n, caps, seeds, device) -> list[list[Completion]]:
        s = self.sampling
        greedy = s.temperature <= 0
        copies = 1 if greedy else n  # greedy samples are all the same completion
        if self.shared_prefill:
            return self._decode(prompts, n, copies, caps, seeds, device)
        rows = [p for p in prompts for _ in range(copies)]  # sample j of prompt i is row i * copies + j
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(rows):  # left padding: every prompt ends at the last column
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        processors = [] if greedy else [SeededSampler(s, _generators(seeds, n, device))]
        from transformers import LogitsProcessorList

        generated = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(caps),
            eos_token_id=list(s.stop_token_ids) or None,
            pad_token_id=self.pad_token_id,
            repetition_penalty=s.repetition_penalty,
            use_cache=True,
            # A sampler: never beam search, whatever the model's generation_config says.
            num_beams=1,
            # Sampling happens in SeededSampler; transformers only takes the argmax. Its own warpers are
            # switched off so that a model's generation_config (e.g. top_k 50) cannot apply.
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList(processors),
        )
        if greedy:
            generated = generated.repeat_interleave(n, dim=0)
        new = generated[:, width:].tolist()  # [P * n, T]
        return [
            [cut_completion(new[i * n + j], s.stop_token_ids, caps[i]) for j in range(n)] for i in range(len(prompts))
        ]

    def _decode(self, prompts, n, copies, caps, seeds, device) -> list[list[Completion]]:
        """``decode.shared_prefill_generate``: the same draws as ``generate``, one prefill per prompt."""
        s = self.sampling
        if s.temperature <= 0:

            def pick(rows, logits):
                return logits.argmax(-1)

        else:
            generators = _generators(seeds, n, device)

            def pick(rows, logits):
                return SeededSampler(s, [generators[r] for r in rows.tolist()])(None, logits).argmax(-1)

        new = decode.shared_prefill_generate(
            self.model,
            prompts,
            copies,
            caps,
            pick,
            pad_token_id=self.pad_token_id,
            stop_token_ids=s.stop_token_ids,
            device=device,
        )
        return [
            [cut_completion(new[i * copies + (j if copies > 1 else 0)], s.stop_token_ids, caps[i]) for j in range(n)]
            for i in range(len(prompts))
        ]

    def sync(self, model, step: int) -> None:
        """Nothing to do: generation uses the training weights themselves."""

    def close(self) -> None:
        """Nothing to release."""

"""Rollouts with transformers ``generate`` on the training device (the default backend)."""

from __future__ import annotations

import torch

from ebft.structured.rollout import Completion, Sampling


def cut_completion(tokens: list[int], stop_ids: tuple[int, ...], cap: int) -> Completion:
    """The completion in ``tokens`` (generated ids, maybe padded): up to and including the first stop
    token, at most ``cap`` tokens. ``finished`` is True only when a stop token ended it within the cap."""
    for i, token in enumerate(tokens[:cap]):
        if token in stop_ids:
            return Completion(ids=tuple(tokens[: i + 1]), finished=True)
    return Completion(ids=tuple(tokens[:cap]), finished=False)


class HFGenerate:
    """``model.generate`` with the ``n`` samples of a prompt batched, stop token ids and the trl sampling
    settings. ``_generate`` takes several left-padded prompts, generates up to the largest cap and cuts
    each completion at its own prompt's cap: for autoregressive sampling that is the same distribution
    as generating each with its own limit. Log-probs are not reported; the trainer scores completions
    with the policy itself (the sampler *is* the policy here).
    """

    def __init__(self, model, *, sampling: Sampling, pad_token_id: int):
        self.model = model
        self.sampling = sampling
        self.pad_token_id = pad_token_id

    def generate(
        self, prompts: list[list[int]], n: int, max_tokens: list[int], seeds: list[int]
    ) -> list[list[Completion]]:
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out: list[list[Completion]] = []
        try:
            # One generate call per prompt (its n samples batched): transformers draws from the global
            # RNG, so only this keeps a prompt's samples independent of which prompts share the call.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                for prompt, cap, seed in zip(prompts, max_tokens, seeds, strict=True):
                    torch.manual_seed(seed)
                    out += self._generate([prompt], n, [cap], device)
        finally:
            self.model.train(was_training)
        return out

    def _generate(self, prompts, n, caps, device) -> list[list[Completion]]:
        s = self.sampling
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        kwargs = {
            "max_new_tokens": max(caps),
            "num_return_sequences": n,
            "eos_token_id": list(s.stop_token_ids) or None,
            "pad_token_id": self.pad_token_id,
            "repetition_penalty": s.repetition_penalty,
            "use_cache": True,
        }
        if s.temperature > 0:
            # Every knob is passed explicitly: a model's own generation_config (e.g. top_k 50) must not apply.
            kwargs.update(
                do_sample=True,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                min_p=s.min_p if s.min_p > 0 else None,
            )
        else:
            # Greedy decoding gives one completion per prompt (transformers refuses num_return_sequences > 1
            # without sampling); its n samples are copies of it.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, num_return_sequences=1)
        generated = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        if s.temperature <= 0:
            generated = generated.repeat_interleave(n, dim=0)
        new = generated[:, width:].tolist()  # [P * n, T]; sample j of prompt i is row i * n + j
        return [
            [cut_completion(new[i * n + j], s.stop_token_ids, caps[i]) for j in range(n)] for i in range(len(prompts))
        ]

    def sync(self, model, step: int) -> None:
        """Nothing to do: generation uses the training weights themselves."""

    def close(self) -> None:
        """Nothing to release."""

"""KV-cached sampling with one prefill per prompt and a batch that shrinks as completions finish.

transformers ``generate`` with n samples per prompt prefills n copies of every prompt and keeps every
row in the batch until the longest completion ends. Here each prompt is prefilled once, its KV cache is
repeated for its n samples, and a row leaves the batch (and its cache) as soon as it stops or reaches its
prompt's cap. Each token is drawn exactly as ``HFGenerate`` draws it: the same ``SeededSampler`` over the
same fp32 logits, each row from its own random stream, so a row's completion does not depend on which
rows share its batch and equals the one ``generate`` produces for the same seed.
"""

from __future__ import annotations

import torch

from ebft.modeling.parts import cache_keyword
from ebft.structured.rollout import Sampling

# generation_config settings under which transformers' generate would change the logits; a model that sets
# one runs through generate itself (``supported``).
_LOGIT_SETTINGS = (
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sequence_bias",
    "exponential_decay_length_penalty",
    "min_length",
)


def supported(model, sampling: Sampling) -> bool:
    """Whether this loop reproduces ``generate`` for ``model``: no repetition penalty, and no generation
    config setting that would alter the logits (``min_new_tokens`` is honoured here)."""
    if sampling.repetition_penalty != 1.0:
        return False
    config = getattr(model, "generation_config", None)
    return not any(getattr(config, key, None) for key in _LOGIT_SETTINGS)


def min_new_tokens(model) -> int:
    """The model's generation_config ``min_new_tokens`` (stop tokens masked until then), 0 when unset."""
    return int(getattr(getattr(model, "generation_config", None), "min_new_tokens", None) or 0)


@torch.no_grad()
def shared_prefill_generate(
    model,
    prompts: list[list[int]],
    copies: int,
    caps: list[int],
    pick,
    *,
    pad_token_id: int,
    stop_token_ids: tuple[int, ...],
    device: torch.device,
) -> list[list[int]]:
    """Generated ids of ``copies`` samples of each prompt, row r = prompt r // copies, sample r % copies.

    ``pick(rows, logits)``: the next token of each active row (``rows`` [A] indices into all P * copies
    rows, ``logits`` [A, V] fp32). A row stops after a stop token or after its prompt's cap tokens; its ids
    include the stop token.
    """
    from transformers import DynamicCache

    P = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((P, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((P, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    # A PEFT wrapper forwards keyword arguments to the model it wraps: ask that model for the cache's name.
    unwrap = getattr(model, "get_base_model", None)
    cache_kw = cache_keyword(unwrap() if unwrap is not None else model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, **{cache_kw: cache})
    logits = out.logits[:, -1].float().repeat_interleave(copies, dim=0)  # [P * copies, V]
    if copies > 1:
        cache.batch_repeat_interleave(copies)
    mask = mask.repeat_interleave(copies, dim=0)
    next_pos = positions[:, -1].repeat_interleave(copies) + 1  # [R]
    row_cap = torch.tensor([caps[r // copies] for r in range(P * copies)], device=device)
    rows = torch.arange(P * copies, device=device)  # active rows
    generated: list[list[int]] = [[] for _ in range(P * copies)]
    stops = torch.tensor(stop_token_ids, dtype=torch.long, device=device)
    forced = min_new_tokens(model)
    step = 0
    while rows.numel():
        if step < forced and stops.numel():
            logits[:, stops] = float("-inf")
        token = pick(rows, logits)  # [A]
        for r, t in zip(rows.tolist(), token.tolist(), strict=True):
            generated[r].append(t)
        step += 1
        done = torch.isin(token, stops) | (step >= row_cap[rows])
        if bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero(as_tuple=True)[0]
            cache.batch_select_indices(keep)
            rows, token, mask, next_pos = rows[keep], token[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            logits_to_keep=1,
            **{cache_kw: cache},
        )
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    return generated

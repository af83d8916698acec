"""KV-cached sampling with one prefill per prompt and a batch that shrinks as completions finish.

transformers ``generate`` with n samples per prompt prefills n copies of every prompt and keeps every
row in the batch until the longest completion ends. Here each prompt is prefilled once, its cache is
repeated for its n samples, and a row leaves the batch (and its cache) as soon as it stops or reaches its
prompt's cap. Each token is drawn exactly as ``HFGenerate`` draws it: the same ``SeededSampler`` over the
same fp32 logits, each row from its own random stream, so a row's completion does not depend on which
rows share its batch and equals the one ``generate`` produces for the same seed.

The cache is the one transformers builds from the model's config (``DynamicCache``): key/value layers for
attention, convolution and recurrent states for linear-attention, state-space and convolution layers
(Qwen3.5, Mamba, LFM2, ...), both for hybrid layers (Falcon-H1). Its rows are repeated and selected with
``reorder_cache``, which every one of those layer types implements over all of its per-row state (beam search
relies on it). Models that keep a cache of another kind, and generation settings this loop does not apply,
run through ``generate`` instead (``generate_reason``).
"""

from __future__ import annotations

import torch

from ebft.attention.kv_cache import PreallocatedCache
from ebft.modeling.parts import cache_keyword
from ebft.structured.rollout import Sampling

# generation_config settings under which transformers' generate would change the logits; a model that sets
# one runs through generate itself (``generate_reason``).
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
    "watermarking_config",
)
# generation_config settings whose default (1.0) changes nothing. (A repetition_penalty there is not one:
# ``HFGenerate`` hands generate trl's own, which takes precedence.)
_FACTOR_SETTINGS = ("guidance_scale",)


def _unwrapped(model):
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    unwrap = getattr(model, "get_base_model", None)
    return unwrap() if unwrap is not None else model


def generate_reason(model, sampling: Sampling) -> str | None:
    """Why ``model`` must sample through transformers ``generate``; None when this loop reproduces it.

    ``generate`` is needed for a repetition penalty, for a generation_config setting that alters the logits
    (``min_new_tokens`` is honoured here), and for a cache this loop cannot repeat and shrink.
    """
    if sampling.repetition_penalty != 1.0:
        return f"trl.repetition_penalty {sampling.repetition_penalty} (the shared-prefill decoder does not apply it)"
    config = getattr(model, "generation_config", None)
    changed = [key for key in _LOGIT_SETTINGS if getattr(config, key, None)]
    changed += [key for key in _FACTOR_SETTINGS if getattr(config, key, None) not in (None, 1, 1.0)]
    if changed:
        return f"the model's generation_config sets {', '.join(changed)} (the shared-prefill decoder does not apply it)"
    return cache_reason(model)


def cache_reason(model) -> str | None:
    """Why this loop cannot carry ``model``'s cache (None when it can): a model that builds a cache of its own
    kind, or a cache layer type whose per-row state ``_select_rows`` is not known to cover."""
    from transformers.cache_utils import (
        DummyLayer,
        DynamicCache,
        DynamicLayer,
        DynamicSlidingWindowLayer,
        LinearAttentionAndFullAttentionLayer,
        LinearAttentionAndSlidingWindowAttentionLayer,
        LinearAttentionLayer,
    )

    base = _unwrapped(model)
    # transformers' own test of whether generate may hand this model a DynamicCache (MiniMax, RWKV, xLSTM
    # and others keep their state in a structure of their own).
    default_cache = getattr(base, "_supports_default_dynamic_cache", None)
    if default_cache is not None and not default_cache():
        return f"{type(base).__name__} keeps its cache in a structure of its own"
    known = (
        DynamicLayer,
        DynamicSlidingWindowLayer,
        LinearAttentionLayer,
        LinearAttentionAndFullAttentionLayer,
        LinearAttentionAndSlidingWindowAttentionLayer,
        DummyLayer,
    )
    other = sorted({type(x).__name__ for x in DynamicCache(config=base.config).layers if type(x) not in known})
    if other:
        return f"its cache has layers of type {other}"
    return None


def _select_rows(cache, rows: torch.Tensor) -> None:
    """Row i of the cache becomes old row ``rows[i]`` in every layer: key/value, convolution and recurrent
    state alike (``rows`` may repeat a row, to give a prompt's samples its prefill)."""
    cache.reorder_cache(rows)


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
    P = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((P, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((P, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    base = _unwrapped(model)
    # Room for the longest completion: each decoding step writes its keys and values in place.
    room = width + max(caps)
    cache = PreallocatedCache(room, config=base.config)
    # A PEFT wrapper forwards keyword arguments to the model it wraps: ask that model for the cache's name.
    cache_kw = cache_keyword(base)

    def next_logits(ids, mask, positions, first: bool) -> torch.Tensor:
        """[R, V] fp32 logits after ``ids``, with the inputs the model's own generation step builds from these
        (``prepare_inputs_for_generation``: Mamba, say, takes no attention mask once its state is cached)."""
        inputs = base.prepare_inputs_for_generation(
            ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            is_first_iteration=first,
            **{cache_kw: cache},
        )
        return model(**inputs).logits[:, -1].float()

    logits = next_logits(ids, mask, positions, True).repeat_interleave(copies, dim=0)  # [P * copies, V]
    if copies > 1:
        _select_rows(cache, torch.arange(P, device=device).repeat_interleave(copies))
    # The attention mask of every step is a view of one [R, room] tensor: ones after the prompts.
    mask = torch.cat([mask, mask.new_ones(P, room - width)], dim=1).repeat_interleave(copies, dim=0)
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
            _select_rows(cache, keep)
            rows, token, mask, next_pos = rows[keep], token[keep], mask[keep], next_pos[keep]
        logits = next_logits(token[:, None], mask[:, : width + step], next_pos[:, None], False)
        next_pos = next_pos + 1
    return generated

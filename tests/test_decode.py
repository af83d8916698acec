"""Shared-prefill decoding (``structured.decode``) against transformers generate, draw for draw."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ebft.structured.hf import HFGenerate
from ebft.structured.rollout import Sampling


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _model(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    with torch.no_grad():  # a peakier policy than the near-uniform random init, so stop tokens get drawn
        model.lm_head.weight.mul_(3.0)
    return model


def _prompts(tok):
    return [_ids(tok, "import sys"), _ids(tok, "def main(argv):\n    return"), _ids(tok, "x = 1"), _ids(tok, "class")]


def _frequent_token(model, tok, prompts) -> int:
    """A token the model draws often: made a stop token, completions end at many different lengths."""
    free = HFGenerate(model, sampling=Sampling(1.0), pad_token_id=tok.pad_token_id, shared_prefill=False)
    drawn = [t for group in free.generate(prompts, 4, [16] * len(prompts), [1, 2, 3, 4]) for c in group for t in c.ids]
    return max(set(drawn), key=drawn.count)


@pytest.mark.parametrize(
    "sampling_kwargs",
    [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9, "top_k": 20}, {"temperature": 1.0, "min_p": 0.05}],
)
def test_shared_prefill_draws_what_generate_draws(tiny_model_dir, tiny_tokenizer, sampling_kwargs):
    tok = tiny_tokenizer
    model = _model(tiny_model_dir)
    prompts = _prompts(tok)
    stop = _frequent_token(model, tok, prompts)
    sampling = Sampling(**sampling_kwargs, stop_token_ids=(tok.eos_token_id, stop))
    caps, seeds = [16, 7, 16, 12], [11, 12, 13, 14]
    hf = HFGenerate(model, sampling=sampling, pad_token_id=tok.pad_token_id, shared_prefill=False)
    shared = HFGenerate(model, sampling=sampling, pad_token_id=tok.pad_token_id)
    want = hf.generate(prompts, 4, caps, seeds)
    got = shared.generate(prompts, 4, caps, seeds)
    assert got == want
    lengths = {len(c.ids) for group in got for c in group}
    assert len(lengths) >= 3 and any(c.finished for group in got for c in group)  # stopping is exercised
    # Independent of batching: each prompt alone draws the same completions.
    for i in range(len(prompts)):
        assert shared.generate([prompts[i]], 4, [caps[i]], [seeds[i]]) == [got[i]]


def test_shared_prefill_greedy_and_min_new_tokens(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    model = _model(tiny_model_dir)
    prompts = _prompts(tok)
    stop = _frequent_token(model, tok, prompts)
    for sampling in (Sampling(0.0, stop_token_ids=(stop,)), Sampling(1.0, stop_token_ids=(stop,))):
        model.generation_config.min_new_tokens = 5  # stop tokens are masked for the first 5 tokens
        hf = HFGenerate(model, sampling=sampling, pad_token_id=tok.pad_token_id, shared_prefill=False)
        shared = HFGenerate(model, sampling=sampling, pad_token_id=tok.pad_token_id)
        want = hf.generate(prompts, 3, [12] * 4, [1, 2, 3, 4])
        got = shared.generate(prompts, 3, [12] * 4, [1, 2, 3, 4])
        assert got == want
        assert all(len(c.ids) >= 5 for group in got for c in group)
        model.generation_config.min_new_tokens = None


def test_one_prefill_per_prompt_and_finished_rows_leave(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    model = _model(tiny_model_dir)
    prompts = _prompts(tok)
    stop = _frequent_token(model, tok, prompts)
    batch_rows: list[tuple[int, int]] = []  # (rows, query tokens) of every forward of the body
    hook = model.model.register_forward_hook(
        lambda m, a, kw, out: batch_rows.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    shared = HFGenerate(model, sampling=Sampling(1.0, stop_token_ids=(stop,)), pad_token_id=tok.pad_token_id)
    got = shared.generate(prompts, 4, [16] * 4, [1, 2, 3, 4])
    hook.remove()
    width = max(len(p) for p in prompts)
    assert batch_rows[0] == (4, width)  # the prefill: 4 prompts, not 16 copies
    decode_rows = [r for r, t in batch_rows[1:]]
    assert all(t == 1 for _, t in batch_rows[1:])
    assert decode_rows == sorted(decode_rows, reverse=True) and decode_rows[0] <= 16
    # Row-steps of decoding equal the tokens generated after the first (each row stops paying when done).
    assert sum(decode_rows) == sum(len(c.ids) - 1 for group in got for c in group)
    assert decode_rows[-1] < 16


def test_repetition_penalty_runs_through_generate(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    model = _model(tiny_model_dir)
    sampling = Sampling(1.0, repetition_penalty=1.3, stop_token_ids=(tok.eos_token_id,))
    shared = HFGenerate(model, sampling=sampling, pad_token_id=tok.pad_token_id)
    hf = HFGenerate(model, sampling=sampling, pad_token_id=tok.pad_token_id, shared_prefill=False)
    prompts = _prompts(tok)
    assert shared.generate(prompts, 2, [8] * 4, [1, 2, 3, 4]) == hf.generate(prompts, 2, [8] * 4, [1, 2, 3, 4])


def test_shared_prefill_avoids_the_deprecated_cache_keyword(tiny_model_dir, tiny_tokenizer):
    """transformers 5.24 deprecates ``past_key_values=`` (removed in 5.40); the decoder, plain or under a
    PEFT wrapper, hands the cache over under the name the wrapped model takes."""
    import warnings

    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer
    model = _model(tiny_model_dir)
    wrapped = get_peft_model(_model(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    sampling = Sampling(1.0, stop_token_ids=(tok.eos_token_id,))
    for m in (model, wrapped):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            out = HFGenerate(m, sampling=sampling, pad_token_id=tok.pad_token_id).generate(
                _prompts(tok), 2, [6] * 4, [1, 2, 3, 4]
            )
        assert [len(group) for group in out] == [2, 2, 2, 2]


def test_in_place_cache_draws_what_the_concatenating_cache_drew(monkeypatch, tiny_model_dir, tiny_tokenizer):
    """The decoder writes each step's keys and values into preallocated buffers (``PreallocatedCache``); before,
    transformers' DynamicCache grew by concatenation. Same prompts, seeds and stops: the same completions, with
    rows leaving the batch at different steps (the buffers' rows are selected as the cache's were)."""
    from transformers import DynamicCache

    from ebft.structured import decode

    tok = tiny_tokenizer
    model = _model(tiny_model_dir)
    prompts = _prompts(tok)
    stop = _frequent_token(model, tok, prompts)
    sampling = Sampling(0.9, top_p=0.95, stop_token_ids=(tok.eos_token_id, stop))
    shared = HFGenerate(model, sampling=sampling, pad_token_id=tok.pad_token_id)
    caps, seeds = [20, 9, 20, 14], [3, 4, 5, 6]
    new = shared.generate(prompts, 4, caps, seeds)
    monkeypatch.setattr(decode, "PreallocatedCache", lambda room, config: DynamicCache(config=config))
    assert shared.generate(prompts, 4, caps, seeds) == new
    assert len({len(c.ids) for group in new for c in group}) >= 3  # rows left at several different steps

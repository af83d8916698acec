"""Structured rollouts: adaptive completion caps, cutting and masking completions, and transformers
generate (seeds, per-prompt caps, greedy decoding, the distribution that is scored).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from structured_builders import (
    FakeBackend,
    assistant_message,
    encode,
    load_model,
    make_row,
    oracle_truncated_dist,
    structured_settings,
    user_message,
)

from ebft.structured.hf import HFGenerate, cut_completion
from ebft.structured.rollout import Completion, Sampling
from ebft.structured.settings import ADAPTIVE_FLOOR, completion_cap
from ebft.structured.step import _single_turn, roll_out

# ---------------------------------------------------------------------------------------------
# Adaptive max tokens


def test_completion_cap_hand_cases(tiny_tokenizer):
    s = structured_settings(
        tiny_tokenizer, max_completion_length=100, adaptive_max_tokens=True, gt_length_multiplier=1.5
    )
    assert ADAPTIVE_FLOOR == 64
    assert completion_cap(10, s) == 64  # ceil(1.5 * 10) = 15 < floor 64
    assert completion_cap(43, s) == 65  # ceil(1.5 * 43) = ceil(64.5) = 65
    assert completion_cap(50, s) == 75  # 1.5 * 50 = 75
    assert completion_cap(80, s) == 100  # 120 > max_completion_length 100
    assert completion_cap(10, replace(s, gt_length_multiplier=8.0)) == 80  # 8 * 10 = 80
    assert completion_cap(10, replace(s, max_completion_length=32)) == 32  # floor 64 but only 32 allowed
    assert completion_cap(10, replace(s, adaptive_max_tokens=False)) == 100  # off: always the maximum
    assert completion_cap(500, replace(s, adaptive_max_tokens=False)) == 100


def test_roll_out_passes_each_prompt_its_own_cap(tiny_tokenizer):
    tok = tiny_tokenizer
    s = structured_settings(
        tok, num_generations=2, max_completion_length=100, adaptive_max_tokens=True, gt_length_multiplier=1.5
    )
    short, middle, long = "ok", " ".join(["self"] * 50), " ".join(["self"] * 90)
    n_short, n_middle, n_long = (len(encode(tok, t)) for t in (short, middle, long))
    assert n_short < 43 and 43 < n_middle < 66 and n_long > 67  # caps: floor, in between, maximum
    rows = [
        make_row(tok, [user_message("alpha")], short),
        make_row(tok, [user_message("bravo")], middle),
        make_row(tok, [user_message("charlie")], long, [user_message("charlie again"), assistant_message(middle)]),
    ]
    backend = FakeBackend(tok)
    roll_out(backend, rows, s, tok, [1, 2, 3])
    first, second = backend.calls
    assert first["max_tokens"] == [64, math.ceil(1.5 * n_middle), 100]
    # The multi-turn row's second reply is capped by the length of the ground-truth reply it replaces.
    assert second["max_tokens"] == [math.ceil(1.5 * n_middle)] * 2
    off = FakeBackend(tok)
    roll_out(off, rows, replace(s, adaptive_max_tokens=False), tok, [1, 2, 3])
    assert off.calls[0]["max_tokens"] == [100, 100, 100] and off.calls[1]["max_tokens"] == [100, 100]


def test_cut_completion_cases():
    stops = (2, 3)
    tokens = [5, 7, 2, 9, 3]
    assert cut_completion(tokens, stops, 5) == Completion((5, 7, 2), True)  # stop inside the cap, kept
    assert cut_completion(tokens, stops, 3) == Completion((5, 7, 2), True)  # stop exactly at the cap
    assert cut_completion(tokens, stops, 2) == Completion((5, 7), False)  # stop after the cap
    assert cut_completion([5, 7, 9], stops, 10) == Completion((5, 7, 9), False)  # no stop at all
    assert cut_completion([5, 3, 0, 0], stops, 4) == Completion((5, 3), True)  # padding after the stop
    assert cut_completion([3], stops, 1) == Completion((3,), True)  # an empty answer still finishes


# ---------------------------------------------------------------------------------------------
# Truncated completions, stop tokens


def test_mask_truncated_completions_and_stop_token(tiny_tokenizer):
    tok = tiny_tokenizer
    row = make_row(tok, [user_message("question")], "answer")
    P = len(row.prompt_ids)
    reply = encode(tok, "some reply")
    done = Completion(tuple(reply + [tok.eos_token_id]), finished=True)
    cut = Completion(tuple(reply), finished=False)
    for mask_truncated in (False, True):
        s = structured_settings(tok, mask_truncated_completions=mask_truncated)
        finished, truncated = _single_turn(row, done, s, tok), _single_turn(row, cut, s, tok)
        # Finished: the stop token is in the sequence and the loss, not in the features.
        assert finished.sequence == list(row.prompt_ids) + reply + [tok.eos_token_id]
        assert finished.loss_mask == [False] * P + [True] * (len(reply) + 1)
        assert finished.feature_length == P + len(reply)
        assert finished.text == "some reply"
        # Truncated: no stop token; the loss is masked only when asked.
        assert truncated.sequence == list(row.prompt_ids) + reply and truncated.feature_length == P + len(reply)
        assert truncated.loss_mask == [False] * P + [not mask_truncated] * len(reply)
        assert truncated.finished is False


# ---------------------------------------------------------------------------------------------
# HFGenerate


def test_hf_generate_seeds_and_prompt_independence(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    model = load_model(tiny_model_dir, lm_head_scale=3.0)
    backend = HFGenerate(
        model, sampling=Sampling(1.0, 0.95, 40, stop_token_ids=(tok.eos_token_id,)), pad_token_id=tok.pad_token_id
    )
    prompts = [encode(tok, "import sys"), encode(tok, "def main(argv):\n    return"), encode(tok, "x = 1")]
    model.train()  # as in training; generate switches to eval and back
    alone = backend.generate([prompts[1]], 3, [10], [7])
    again = backend.generate([prompts[1]], 3, [10], [7])
    assert alone == again  # same seed, same completions
    assert len({c.ids for c in alone[0]}) > 1  # the n samples of one prompt differ
    batch = backend.generate(prompts, 3, [6, 10, 4], [5, 7, 9])
    assert batch[1] == alone[0]  # other prompts (and their caps) in the call change nothing
    assert backend.generate([prompts[1]], 3, [10], [8]) != alone  # another seed, other completions
    assert model.training  # generate restores the mode it found


def test_hf_generate_cuts_each_prompt_at_its_own_cap(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    model = load_model(tiny_model_dir, lm_head_scale=3.0)
    prompts = [encode(tok, "import sys"), encode(tok, "for i in")]
    free = HFGenerate(model, sampling=Sampling(1.0), pad_token_id=tok.pad_token_id)
    long = free.generate(prompts, 4, [12, 12], [3, 4])
    # Make some completions stop: the 3rd token of prompt 0's first sample becomes a stop token.
    stop = long[0][0].ids[2]
    backend = HFGenerate(model, sampling=Sampling(1.0, stop_token_ids=(stop,)), pad_token_id=tok.pad_token_id)
    full = backend.generate(prompts, 4, [12, 12], [3, 4])
    capped = backend.generate(prompts, 4, [3, 8], [3, 4])
    for i, cap in enumerate((3, 8)):
        for c_full, c in zip(full[i], capped[i], strict=True):
            # Same seed: the capped completion is the 12-token one cut at this prompt's cap.
            assert c == cut_completion(list(c_full.ids), (stop,), cap)
            assert len(c.ids) <= cap and (c.finished or len(c.ids) == cap)
    assert capped[0][0] == Completion(long[0][0].ids[:3], True)
    assert any(not c.finished for group in capped for c in group)


def test_hf_generate_greedy_is_argmax_decoding(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    model = load_model(tiny_model_dir, lm_head_scale=3.0)
    prompt = encode(tok, "def main():")
    # Stop on the 4th greedy token so that the stop path is taken.
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    greedy_free = seq[len(prompt) :]
    stop = greedy_free[3]
    first_stop = greedy_free.index(stop)
    backend = HFGenerate(model, sampling=Sampling(0.0, stop_token_ids=(stop,)), pad_token_id=tok.pad_token_id)
    out = backend.generate([prompt], 2, [12], [0])
    assert out[0] == [Completion(tuple(greedy_free[: first_stop + 1]), True)] * 2
    free = HFGenerate(model, sampling=Sampling(0.0), pad_token_id=tok.pad_token_id).generate([prompt], 1, [12], [5])
    assert free[0] == [Completion(tuple(greedy_free), False)]


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 20, 0.9, 0.0), (1.0, 0, 0.6, 0.02)],
)
def test_hf_generate_samples_the_distribution_that_is_scored(
    tiny_model_dir, tiny_tokenizer, temperature, top_k, top_p, min_p
):
    """The policy gradient is on-policy only if generate draws from exactly the distribution that
    policy_logprobs scores. For first tokens x ~ q (generate), E_q[log p(x)] = -H(p) iff q = p (up to the
    KL divergence); 4000 draws put the mean within a few standard errors."""
    tok = tiny_tokenizer
    sampling = Sampling(temperature, top_p, top_k, min_p, stop_token_ids=(tok.eos_token_id,))
    model = load_model(tiny_model_dir, lm_head_scale=3.0)
    prompt = encode(tok, "def main():")
    (draws,) = HFGenerate(model, sampling=sampling, pad_token_id=tok.pad_token_id).generate([prompt], 4000, [1], [3])
    with torch.no_grad():
        z = model(torch.tensor([prompt])).logits[0, -1].float() / temperature
        logp = oracle_truncated_dist(z, top_k, top_p, min_p)
    kept = torch.isfinite(logp)
    entropy = -(logp[kept].exp() * logp[kept]).sum()
    sampled = torch.tensor([c.ids[0] for c in draws])
    assert kept[sampled].all()  # nothing outside the truncated set
    values = logp[sampled]
    stderr = float(values.std()) / math.sqrt(len(values))
    assert abs(float(values.mean()) + float(entropy)) < 4 * stderr + 1e-3

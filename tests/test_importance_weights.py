"""Importance weights of the structured step: sampler log-probs weigh nothing without the correction, and
with it they are masked, taken only where reported, and clamped to the configured bounds.
"""

from __future__ import annotations

import math

import pytest
import torch
from structured_builders import (
    encode,
    flat_grad,
    load_model,
    make_row,
    run_step,
    structured_settings,
    teacher_forced_logp,
    user_message,
)

from ebft.config import TrlSection
from ebft.structured.rollout import Completion
from ebft.structured.scoring import Scores
from ebft.structured.step import RolloutBuffer, _single_turn


def test_sampler_logprobs_weigh_nothing_without_the_correction(tiny_model_dir, tiny_tokenizer):
    """Rollouts that carry the sampler's log-probs (vLLM) are not reweighted when the importance-sampling
    correction is off: the gradient is the plain on-policy one and no importance metrics are reported."""
    tok = tiny_tokenizer
    s = structured_settings(tok, num_generations=2, loss_type="dapo", is_correction=False)
    model = load_model(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    row = make_row(tok, [user_message("question")], "answer")
    ids = tuple(encode(tok, "a reply") + [tok.eos_token_id])
    with torch.no_grad():
        current = teacher_forced_logp(model, list(row.prompt_ids) + list(ids))[len(row.prompt_ids) - 1 :]
    # With the correction on these would weigh exp(log 2) = 2 per token.
    sample = _single_turn(row, Completion(ids, True, tuple((current - math.log(2.0)).tolist())), s, tok)
    other = _single_turn(row, Completion(ids, True), s, tok)
    zeros = torch.zeros(1, 2)
    advantage = torch.tensor([1.0, -0.5])
    buffer = RolloutBuffer([row], [sample, other], Scores(zeros, zeros, zeros, zeros, zeros[:, 0]), advantage, 0)
    (sums,) = run_step(model, buffer, s, tok, [[0, 1]])
    assert (sums.is_tokens, sums.is_ratio_sum, sums.is_ratio_min) == (0, 0, math.inf)
    logp = teacher_forced_logp(model, sample.sequence)[len(row.prompt_ids) - 1 :]
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-(1.0 - 0.5) * logp.sum() / (2 * len(ids)), params)])
    torch.testing.assert_close(flat_grad(params), want, atol=1e-6, rtol=1e-4)


def test_importance_weights_with_masked_truncated_completions(tiny_model_dir, tiny_tokenizer):
    """vLLM rollouts carry the sampler's log-probs; a micro-batch that also holds a masked (truncated)
    completion must still weight its finished completions' tokens by pi_old / pi_sampler."""
    tok = tiny_tokenizer
    s = structured_settings(
        tok,
        num_generations=2,
        loss_type="dapo",
        mask_truncated_completions=True,
        is_correction=True,
        is_bounds=(1 / 3.0, 3.0),
    )
    model = load_model(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    row = make_row(tok, [user_message("question")], "answer")
    done_ids = tuple(encode(tok, "a finished reply") + [tok.eos_token_id])
    with torch.no_grad():
        current = teacher_forced_logp(model, list(row.prompt_ids) + list(done_ids))[len(row.prompt_ids) - 1 :]
    # The sampler's log-probs are log 2 below the policy's: importance weight exp(log 2) = 2 on every token.
    done = Completion(done_ids, True, tuple((current - math.log(2.0)).tolist()))
    cut_ids = tuple(encode(tok, "cut off"))
    cut = Completion(cut_ids, False, tuple([-1.0] * len(cut_ids)))
    samples = [_single_turn(row, c, s, tok) for c in (done, cut)]
    advantage = torch.tensor([1.0, -1.0])
    zeros = torch.zeros(1, 2)
    buffer = RolloutBuffer([row], samples, Scores(zeros, zeros, zeros, zeros, zeros[:, 0]), advantage, 0)
    (sums,) = run_step(model, buffer, s, tok, [[0, 1]])
    got = flat_grad(params)
    assert sums.is_tokens == len(done_ids)
    assert sums.is_ratio_sum == pytest.approx(2.0 * len(done_ids), rel=1e-4)
    logp = teacher_forced_logp(model, samples[0].sequence)[len(row.prompt_ids) - 1 :]
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-2.0 * logp.sum() / len(done_ids), params)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_importance_weights_only_where_the_sampler_reported_log_probs(tiny_model_dir, tiny_tokenizer):
    """A sample without sampler log-probs (a re-tokenised multi-turn reply) keeps weight 1, while the
    others in its micro-batch are still weighted by pi_old / pi_sampler."""
    tok = tiny_tokenizer
    s = structured_settings(tok, num_generations=2, loss_type="dapo", is_correction=True, is_bounds=(1 / 3.0, 3.0))
    model = load_model(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    row = make_row(tok, [user_message("question")], "answer")
    a_ids = tuple(encode(tok, "first reply") + [tok.eos_token_id])
    b_ids = tuple(encode(tok, "second") + [tok.eos_token_id])
    with torch.no_grad():
        current = teacher_forced_logp(model, list(row.prompt_ids) + list(a_ids))[len(row.prompt_ids) - 1 :]
    # Sample a: the sampler's log-probs are log 4 below the policy's, so w = min(4, cap 3) = 3 per token.
    # Sample b: no log-probs reported, so w = 1.
    a = Completion(a_ids, True, tuple((current - math.log(4.0)).tolist()))
    b = Completion(b_ids, True)
    samples = [_single_turn(row, c, s, tok) for c in (a, b)]
    advantage = torch.tensor([1.0, -1.0])
    zeros = torch.zeros(1, 2)
    buffer = RolloutBuffer([row], samples, Scores(zeros, zeros, zeros, zeros, zeros[:, 0]), advantage, 0)
    (sums,) = run_step(model, buffer, s, tok, [[0, 1]])
    got = flat_grad(params)
    assert sums.is_tokens == len(a_ids)  # only the reported tokens enter the IS metrics
    assert sums.is_ratio_sum == pytest.approx(4.0 * len(a_ids), rel=1e-4)  # raw ratio 4 before the clamp
    tokens = len(a_ids) + len(b_ids)  # dapo: mean over every loss token of the step
    logp_a = teacher_forced_logp(model, samples[0].sequence)[len(row.prompt_ids) - 1 :]
    logp_b = teacher_forced_logp(model, samples[1].sequence)[len(row.prompt_ids) - 1 :]
    loss = (-3.0 * 1.0 * logp_a.sum() - 1.0 * (-1.0) * logp_b.sum()) / tokens
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_importance_weights_are_clamped_to_the_trl_clip_bounds(tiny_model_dir, tiny_tokenizer):
    """trl.vllm_importance_sampling_clip_min / _max (axolotl 0.19's names) set both ends of the clamp."""
    tok = tiny_tokenizer
    trl = TrlSection(vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.5)
    s = structured_settings(
        tok, num_generations=2, loss_type="dapo", is_correction=True, is_bounds=trl.importance_weight_bounds
    )
    model = load_model(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    row = make_row(tok, [user_message("question")], "answer")
    a_ids = tuple(encode(tok, "first reply") + [tok.eos_token_id])
    b_ids = tuple(encode(tok, "second") + [tok.eos_token_id])
    with torch.no_grad():
        logp_a_now = teacher_forced_logp(model, list(row.prompt_ids) + list(a_ids))[len(row.prompt_ids) - 1 :]
        logp_b_now = teacher_forced_logp(model, list(row.prompt_ids) + list(b_ids))[len(row.prompt_ids) - 1 :]
    # a: sampler log-probs log 4 below the policy's, raw w = 4, clamped to clip_max 2.5 (the cap 3 is not read).
    # b: sampler log-probs log 4 above, raw w = 1/4, clamped to clip_min 0.5 (not 1/cap or 1/clip_max = 0.4).
    a = Completion(a_ids, True, tuple((logp_a_now - math.log(4.0)).tolist()))
    b = Completion(b_ids, True, tuple((logp_b_now + math.log(4.0)).tolist()))
    samples = [_single_turn(row, c, s, tok) for c in (a, b)]
    advantage = torch.tensor([1.0, -1.0])
    zeros = torch.zeros(1, 2)
    buffer = RolloutBuffer([row], samples, Scores(zeros, zeros, zeros, zeros, zeros[:, 0]), advantage, 0)
    (sums,) = run_step(model, buffer, s, tok, [[0, 1]])
    got = flat_grad(params)
    # Raw ratios before the clamp: 4 per token of a, 1/4 per token of b.
    assert sums.is_ratio_sum == pytest.approx(4.0 * len(a_ids) + 0.25 * len(b_ids), rel=1e-4)
    tokens = len(a_ids) + len(b_ids)  # dapo: mean over every loss token of the step
    logp_a = teacher_forced_logp(model, samples[0].sequence)[len(row.prompt_ids) - 1 :]
    logp_b = teacher_forced_logp(model, samples[1].sequence)[len(row.prompt_ids) - 1 :]
    loss = (-2.5 * 1.0 * logp_a.sum() - 0.5 * (-1.0) * logp_b.sum()) / tokens
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_importance_weights_are_clamped_to_one_over_cap_from_below(tiny_model_dir, tiny_tokenizer):
    """The weight pi_old / pi_sampler is clamped to [1/cap, cap]: a token the sampler found far likelier than
    the policy does (raw ratio 1/4) weighs 1/3 with cap 3, one it found far less likely (raw 4) weighs 3."""
    tok = tiny_tokenizer
    s = structured_settings(
        tok,
        num_generations=2,
        loss_type="dapo",
        is_correction=True,
        is_bounds=TrlSection(vllm_importance_sampling_cap=3.0).importance_weight_bounds,
    )
    model = load_model(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    row = make_row(tok, [user_message("question")], "answer")
    a_ids = tuple(encode(tok, "first reply") + [tok.eos_token_id])
    b_ids = tuple(encode(tok, "second") + [tok.eos_token_id])
    with torch.no_grad():
        current = [
            teacher_forced_logp(model, list(row.prompt_ids) + list(ids))[len(row.prompt_ids) - 1 :]
            for ids in (a_ids, b_ids)
        ]
    # Sample a: sampler log-probs log 4 above the policy's -> raw ratio 1/4 -> w = max(1/4, 1/3) = 1/3.
    # Sample b: sampler log-probs log 4 below the policy's -> raw ratio 4 -> w = min(4, 3) = 3.
    a = Completion(a_ids, True, tuple((current[0] + math.log(4.0)).tolist()))
    b = Completion(b_ids, True, tuple((current[1] - math.log(4.0)).tolist()))
    samples = [_single_turn(row, c, s, tok) for c in (a, b)]
    advantage = torch.tensor([1.0, -1.0])
    zeros = torch.zeros(1, 2)
    buffer = RolloutBuffer([row], samples, Scores(zeros, zeros, zeros, zeros, zeros[:, 0]), advantage, 0)
    (sums,) = run_step(model, buffer, s, tok, [[0, 1]])
    got = flat_grad(params)
    tokens = len(a_ids) + len(b_ids)
    assert sums.is_tokens == tokens
    assert sums.is_ratio_min == pytest.approx(0.25, rel=1e-4)  # the raw ratio, before the clamp
    assert sums.is_ratio_sum == pytest.approx(0.25 * len(a_ids) + 4.0 * len(b_ids), rel=1e-4)
    logp_a = teacher_forced_logp(model, samples[0].sequence)[len(row.prompt_ids) - 1 :]
    logp_b = teacher_forced_logp(model, samples[1].sequence)[len(row.prompt_ids) - 1 :]
    # dapo on-policy: -(w * A * logp) summed over the step's tokens / its token count.
    loss = (-(1.0 / 3.0) * 1.0 * logp_a.sum() - 3.0 * (-1.0) * logp_b.sum()) / tokens
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)

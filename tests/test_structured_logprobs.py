"""Policy log-probs of the structured step against a per-sequence oracle under temperature and truncation
(top-k, top-p, min-p), and the count of log-probs the loss reads.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from structured_builders import encode, load_model, oracle_truncated_dist, structured_settings

from ebft.sampling import truncation_keep
from ebft.structured.hf import HFGenerate
from ebft.structured.rollout import Sample, Sampling, loss_token_count
from ebft.structured.step import policy_logprobs


def _oracle_truncated_logp(z: torch.Tensor, target: int, top_k: int, top_p: float, min_p: float):
    """log-prob of ``target`` and entropy of the truncated distribution (``_oracle_truncated_dist``)."""
    logp = oracle_truncated_dist(z, top_k, top_p, min_p)
    assert torch.isfinite(logp[target]), "the sampled token lies outside the truncated set"
    kept = torch.isfinite(logp)
    entropy = -(logp[kept].exp() * logp[kept]).sum()
    return logp[target], entropy


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [
        (1.0, 0, 1.0, 0.0),
        (0.7, 0, 1.0, 0.0),
        (1.0, 5, 1.0, 0.0),
        (0.8, 0, 0.8, 0.0),
        (1.0, 0, 1.0, 0.1),
        (0.9, 8, 0.9, 0.05),
    ],
)
def test_policy_logprobs_match_per_sequence_oracle(tiny_model_dir, tiny_tokenizer, temperature, top_k, top_p, min_p):
    tok = tiny_tokenizer
    sampling = Sampling(temperature, top_p, top_k, min_p, stop_token_ids=(tok.eos_token_id,))
    s = structured_settings(tok, sampling=sampling)
    model = load_model(tiny_model_dir, lm_head_scale=6.0)
    prompts = [encode(tok, "import os"), encode(tok, "class Widget(object):\n    def __init__(self):")]
    # Completions drawn by HF generate with these very settings, so every target is in the sampler's set.
    drawn = HFGenerate(model, sampling=sampling, pad_token_id=tok.pad_token_id).generate(prompts, 2, [5, 12], [1, 2])
    samples = []
    for prompt, group in zip(prompts, drawn, strict=True):
        for c in group:
            samples.append(
                Sample(
                    prompt + list(c.ids), len(prompt), [False] * len(prompt) + [True] * len(c.ids), 0, c.finished, ""
                )
            )
    lengths = [len(q.sequence) for q in samples]
    assert len(set(lengths)) > 1  # right padding is exercised
    with torch.no_grad():
        logp, seq, entropy = policy_logprobs(model, samples, s, tok.pad_token_id, with_entropy=True)
        alone = [policy_logprobs(model, [q], s, tok.pad_token_id)[0] for q in samples]
        want_logp, want_entropy, want_seq = [], [], []
        for i, q in enumerate(samples):
            ids = torch.tensor([q.sequence])
            logits = model(ids).logits[0].float() / temperature
            for t in range(1, len(q.sequence)):
                if q.loss_mask[t]:
                    lp, ent = _oracle_truncated_logp(logits[t - 1], q.sequence[t], top_k, top_p, min_p)
                    want_logp.append(lp)
                    want_entropy.append(ent)
                    want_seq.append(i)
    assert seq.tolist() == want_seq
    torch.testing.assert_close(logp.double(), torch.stack(want_logp), atol=2e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), torch.stack(want_entropy), atol=2e-5, rtol=0)
    # Each sequence alone (no padding at all) gives the same values as inside the padded batch.
    torch.testing.assert_close(torch.cat(alone), logp, atol=1e-5, rtol=0)


def test_truncation_keep_order_hand_example():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # top-p 0.75 alone: mass before each token 0, 0.4, 0.7, 0.9 -> keeps tokens 0, 1, 2
    assert truncation_keep(logits, top_p=0.75).tolist() == [True, True, True, False]
    # top-k 3 first renormalises to 4/9, 3/9, 2/9; top-p 0.75 then sees mass before 0, 0.444, 0.778 -> 0, 1
    assert truncation_keep(logits, top_p=0.75, top_k=3).tolist() == [True, True, False, False]
    # min-p 0.6 after top-k 3: threshold 0.6 * 4/9 = 0.267; 3/9 = 0.333 stays, 2/9 = 0.222 goes
    assert truncation_keep(logits, top_k=3, min_p=0.6).tolist() == [True, True, False, False]
    # top-p 0.95 keeps all four (0.9 < 0.95); min-p 0.3 then drops 0.1 < 0.3 * 0.4 = 0.12
    assert truncation_keep(logits, top_p=0.95, min_p=0.3).tolist() == [True, True, True, False]
    # top-k 1 keeps the argmax only, whatever top-p says
    assert truncation_keep(logits, top_p=0.99, top_k=1).tolist() == [True, False, False, False]


def test_truncation_keep_matches_transformers_warpers():
    """Independent implementation: transformers' own logits warpers, in generate's order."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen) * 2.5
    for top_k, top_p, min_p in [(10, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2), (12, 0.8, 0.05), (20, 0.5, 0.3)]:
        scores = logits.clone()
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
        if min_p:
            scores = MinPLogitsWarper(min_p)(None, scores)
        assert torch.equal(truncation_keep(logits, top_p=top_p, top_k=top_k, min_p=min_p), scores > -math.inf)


def test_loss_token_count_is_the_number_of_log_probs_the_loss_reads(tiny_model_dir, tiny_tokenizer):
    """The step's token denominators (dapo, is_tokens, skipping) count what ``policy_logprobs`` scores."""
    tok = tiny_tokenizer
    s = structured_settings(tok, num_generations=1)

    def single(seq, mask):
        return Sample(seq, 1, mask, len(seq), True, "")

    samples = [
        # A one-token prompt: both completion tokens are predicted (at positions 0 and 1): 2.
        single([7, 8, 9], [False, True, True]),
        # A view's first token has no position before it, so it cannot be a target: 1 of 2.
        single([7, 8, 9], [True, True, False]),
        # Multi-turn, one view per reply: (ctx 7 | reply 8, 9) gives 2, (ctx 7, 8, 9, 10 | reply 11) gives 1: 3.
        replace(single([7, 8, 9, 10, 11], [False] * 5), turns=(((7,), (8, 9)), ((7, 8, 9, 10), (11,)))),
        # The same conversation excluded from the loss: 0.
        replace(single([7, 8, 9, 10, 11], [False] * 5), turns=(((7,), (8, 9)), ((7, 8, 9, 10), (11,))), trained=False),
    ]
    assert [loss_token_count(q) for q in samples] == [2, 1, 3, 0]
    with torch.no_grad():
        _, seq = policy_logprobs(load_model(tiny_model_dir), samples, s, tok.pad_token_id)
    assert torch.bincount(seq, minlength=len(samples)).tolist() == [2, 1, 3, 0]

"""Structured rewards and advantages against hidden states read directly from the model (docs/design.md §5).

Rewards are recomputed from ``output_hidden_states`` of a separately loaded model, one unpadded sequence
at a time.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest
import torch
from structured_builders import encode, load_model, make_row, structured_settings, user_message

from ebft import features as feat
from ebft import rewards
from ebft.modeling.feature_network import FeatureNetwork
from ebft.structured.rollout import Completion
from ebft.structured.scoring import score
from ebft.structured.step import _single_turn


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """A separately loaded copy of the tiny model: the oracle side, never trained or wrapped."""
    return load_model(tiny_model_dir).eval()


def _oracle_pool(model, seq: list[int], prompt_length: int, fractions, method: str, norm: str) -> torch.Tensor:
    """Pooled feature of one unpadded sequence, from output_hidden_states (float64)."""
    with torch.no_grad():
        hidden = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
    num_layers = model.config.num_hidden_layers
    layers = [hidden[int(f * num_layers)][0].double() for f in fractions]  # each [T, H]
    if norm == "per_layer":  # each chosen layer L2-normalised per token, then concatenated -> [T, F * H]
        tokens = torch.cat([torch.nn.functional.normalize(h, dim=-1) for h in layers], dim=-1)
    elif norm == "joint":  # the concatenation normalised per token
        tokens = torch.nn.functional.normalize(torch.cat(layers, dim=-1), dim=-1)
    else:  # none: concatenated as they are
        tokens = torch.cat(layers, dim=-1)
    n = len(seq)
    if method == "last_token":
        return tokens[n - 1]
    if method == "mean_pooling":
        return tokens.mean(0)
    if method == "completion_mean":
        return tokens[prompt_length:].mean(0)
    assert method == "concat"
    return torch.cat([tokens[(k * n) // 4] for k in (1, 2, 3)])


def _scoring_batch(tok):
    """Two prompts of different lengths, three completions each of different lengths, some with EOS."""
    rows = [
        make_row(tok, [user_message("def add(a, b):")], "    return a + b"),
        make_row(
            tok,
            [user_message("Write a loop that prints the numbers from one to ten, one per line.")],
            "for i in range(1, 11):\n    print(i)",
        ),
    ]
    texts = [
        ["    return a - b", "    pass", "    return sum([a, b]) if a else b"],
        ["print(1)", "for i in range(10): print(i + 1)", "while True:\n    break"],
    ]
    eos = tok.eos_token_id
    comps = [
        [Completion(tuple(encode(tok, t) + ([eos] if j != 1 else [])), finished=j != 1) for j, t in enumerate(group)]
        for group in texts
    ]
    return rows, texts, comps


@pytest.mark.parametrize(
    ("method", "norm"),
    [("last_token", "per_layer"), ("mean_pooling", "joint"), ("completion_mean", "none"), ("concat", "per_layer")],
)
@pytest.mark.parametrize("whitening", [False, True])
def test_score_matches_rewards_from_output_hidden_states(
    tiny_model_dir, tiny_tokenizer, reference, method, norm, whitening
):
    tok = tiny_tokenizer
    fractions = [0.25, 0.5, 1.0]  # hidden-state indices int(f * 4) = 1, 2, 4 (4 = after the final norm)
    # Both whitening spaces, without more cases: they differ in the ground truth's whitened vector.
    space = "sample" if method in ("mean_pooling", "concat") else "feature"
    s = structured_settings(
        tok,
        embed_method=method,
        feature_norm=norm,
        use_whitening=whitening,
        whitening_space=space,
        alignment_coef=1.3,
        diversity_coef=0.7,
    )
    rows, texts, comps = _scoring_batch(tok)
    samples = [_single_turn(row, c, s, tok) for row, group in zip(rows, comps, strict=True) for c in group]
    # What the feature network pools: prompt + completion content, without the stop token.
    expected_seqs = [
        list(row.prompt_ids) + encode(tok, t) for row, group in zip(rows, texts, strict=True) for t in group
    ]
    assert [q.sequence[: q.feature_length] for q in samples] == expected_seqs

    policy = load_model(tiny_model_dir)
    network = FeatureNetwork(policy, feat.layer_indices(fractions, 4))
    scores = score(network, rows, samples, s, tok.pad_token_id, batch_size=4)  # 6 sequences: two padded batches

    P, G = 2, 3
    gen = torch.stack(
        [
            _oracle_pool(reference, seq, q.prompt_length, fractions, method, norm)
            for seq, q in zip(expected_seqs, samples, strict=True)
        ]
    ).reshape(P, G, -1)
    gt = torch.stack(
        [
            _oracle_pool(
                reference, list(r.prompt_ids) + encode(tok, r.ground_truth), len(r.prompt_ids), fractions, method, norm
            )
            for r in rows
        ]
    )
    if whitening:
        want = rewards.reward_terms(
            gen.float(), gt.float(), alignment_coef=1.3, diversity_coef=0.7, use_whitening=True, whitening_space=space
        )
        alignment, diversity, reward, cfm = want.alignment, want.diversity, want.reward, want.cfm
    else:
        phi = torch.nn.functional.normalize(gen, dim=-1)
        phi_gt = torch.nn.functional.normalize(gt, dim=-1)
        alignment = torch.zeros(P, G, dtype=torch.float64)
        diversity = torch.zeros(P, G, dtype=torch.float64)
        cfm = torch.zeros(P, dtype=torch.float64)
        for p in range(P):
            for j in range(G):
                alignment[p, j] = 2 * torch.dot(phi[p, j], phi_gt[p])  # 2 cos: both are unit vectors
                others = sum(torch.dot(phi[p, j], phi[p, k]) for k in range(G) if k != j)
                diversity[p, j] = 2 / (G - 1) * others
            cfm[p] = ((phi[p].mean(0) - phi_gt[p]) ** 2).sum()
        reward = 1.3 * alignment - 0.7 * diversity
    torch.testing.assert_close(scores.alignment.double(), alignment.double(), atol=2e-5, rtol=0)
    torch.testing.assert_close(scores.diversity.double(), diversity.double(), atol=2e-5, rtol=0)
    torch.testing.assert_close(scores.reward.double(), reward.double(), atol=3e-5, rtol=0)
    torch.testing.assert_close(scores.cfm.double(), cfm.double(), atol=2e-5, rtol=0)
    # scale_rewards group: (r - group mean) / (unbiased group std + 1e-4)
    for p in range(P):
        r = [float(v) for v in scores.reward[p]]
        mean, std = statistics.mean(r), statistics.stdev(r)
        for j in range(G):
            assert float(scores.advantage[p, j]) == pytest.approx((r[j] - mean) / (std + 1e-4), abs=1e-5)


def test_score_batch_and_none_scaling(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    rows, _, comps = _scoring_batch(tok)
    network = FeatureNetwork(load_model(tiny_model_dir), feat.layer_indices([0.5, 1.0], 4))
    seen = []

    def batch_std(reward):
        seen.append(reward.clone())
        return 0.25

    s = structured_settings(tok, scale_rewards="batch")
    samples = [_single_turn(row, c, s, tok) for row, group in zip(rows, comps, strict=True) for c in group]
    batch = score(network, rows, samples, s, tok.pad_token_id, batch_size=8, batch_std=batch_std)
    none = score(network, rows, samples, replace(s, scale_rewards="none"), tok.pad_token_id, batch_size=8)
    torch.testing.assert_close(seen[0], batch.reward)  # batch_std sees this batch's rewards
    centred = batch.reward - batch.reward.mean(-1, keepdim=True)
    torch.testing.assert_close(batch.advantage, centred / (0.25 + 1e-4))
    torch.testing.assert_close(none.advantage, centred)

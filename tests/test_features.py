"""Layer selection, layer combination and pooling (ebft.features) against hand values and oracles."""

from __future__ import annotations

import math

import pytest
import torch

from ebft.features import combine_layers, layer_indices, pool


@pytest.mark.parametrize(
    ("num_layers", "expected"),
    [
        (4, [1, 2, 3]),  # 0.25*4 = 1, 0.5*4 = 2, 0.75*4 = 3
        (16, [4, 8, 12]),  # Llama-3.2-1B in the paper configs
        (28, [7, 14, 21]),  # Qwen2.5-1.5B / 7B in the paper configs
    ],
)
def test_layer_indices_quartiles(num_layers, expected):
    assert layer_indices([0.25, 0.5, 0.75], num_layers) == expected


def test_layer_indices_ends_and_truncation():
    # 0 -> embedding output, 1 -> last layer (index num_layers, not num_layers - 1).
    # Truncation, not rounding: int(0.3 * 28) = int(8.4) = 8 and int(0.35 * 28) = int(9.8) = 9, where
    # rounding would give 10; int(0.7 * 4) = int(2.8) = 2, where rounding would give 3.
    assert layer_indices([0.0, 1.0, 0.3, 0.35], 28) == [0, 28, 8, 9]
    assert layer_indices([0.7], 4) == [2]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_layer_indices_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="fraction"):
        layer_indices([0.5, bad], 4)


def test_layer_indices_of_a_one_layer_model():
    # hidden_states has 2 entries: 0 (embeddings) and 1 (the only layer); int(0.5 * 1) = 0, int(1.0 * 1) = 1.
    assert layer_indices([0.0, 0.5, 1.0], 1) == [0, 0, 1]


def test_layer_indices_rejects_no_layers():
    with pytest.raises(ValueError, match="num_layers"):
        layer_indices([0.5], 0)


def test_combine_layers_hand_vectors():
    a = torch.tensor([3.0, 4.0])
    b = torch.tensor([0.0, 2.0])
    # per_layer: [3,4]/5 = [0.6, 0.8]; [0,2]/2 = [0, 1].
    assert torch.allclose(combine_layers([a, b], "per_layer"), torch.tensor([0.6, 0.8, 0.0, 1.0]))
    # joint: [3,4,0,2] / sqrt(9 + 16 + 0 + 4) = / sqrt(29).
    r29 = math.sqrt(29.0)
    expected_joint = torch.tensor([3 / r29, 4 / r29, 0.0, 2 / r29])
    assert torch.allclose(combine_layers([a, b], "joint"), expected_joint)
    assert torch.equal(combine_layers([a, b], "none"), torch.tensor([3.0, 4.0, 0.0, 2.0]))


def test_combine_layers_default_is_per_layer_and_keeps_leading_dims():
    torch.manual_seed(0)
    layers = [torch.randn(2, 3, 5) * s for s in (1.0, 10.0)]
    out = combine_layers(layers)
    assert out.shape == (2, 3, 10)
    # Each half is a unit vector per token, whatever the scale of its layer.
    assert torch.allclose(out[..., :5].norm(dim=-1), torch.ones(2, 3))
    assert torch.allclose(out[..., 5:].norm(dim=-1), torch.ones(2, 3))


def test_combine_layers_zero_vector_stays_zero():
    out = combine_layers([torch.zeros(2), torch.tensor([0.0, 2.0])], "per_layer")
    assert torch.equal(out, torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert torch.equal(combine_layers([torch.zeros(3)], "joint"), torch.zeros(3))


def test_combine_layers_keeps_low_precision_dtype():
    h = torch.full((4,), 300.0, dtype=torch.float16)  # squared norm 4 * 9e4 overflows float16
    out = combine_layers([h, h], "per_layer")
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), torch.full((8,), 0.5))  # 300 / sqrt(4 * 300^2) = 1/2


def test_combine_layers_rejects_bad_input():
    with pytest.raises(ValueError, match="feature_norm"):
        combine_layers([torch.ones(2)], "layerwise")
    with pytest.raises(ValueError, match="same shape"):
        combine_layers([torch.ones(2), torch.ones(3)], "none")
    with pytest.raises(ValueError, match="^combine_layers needs at least one layer$"):
        combine_layers([], "none")


# Hand tensor: 2 sequences of T = 4 tokens, E = 2; token t of sequence b is [10b + t, -(10b + t)].
# Sequence 0 is right-padded (valid t = 0..2), sequence 1 left-padded (valid t = 1..3).
def _hand_batch():
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]])
    tokens = torch.stack([values, -values], dim=-1)  # [2, 4, 2]
    valid = torch.tensor([[True, True, True, False], [False, True, True, True]])
    return tokens, valid


def _vec(v):
    return torch.tensor([v, -v])


def test_pool_last_token_hand():
    tokens, valid = _hand_batch()
    out = pool(tokens, valid, "last_token")
    assert torch.equal(out, torch.stack([_vec(2.0), _vec(13.0)]))


def test_pool_mean_pooling_hand():
    tokens, valid = _hand_batch()
    # (0 + 1 + 2)/3 = 1; (11 + 12 + 13)/3 = 12; the padded tokens 3 and 10 are ignored.
    out = pool(tokens, valid, "mean_pooling")
    assert torch.allclose(out, torch.stack([_vec(1.0), _vec(12.0)]))


def test_pool_completion_mean_hand():
    tokens, valid = _hand_batch()
    completion = torch.tensor([[False, True, True, True], [True, False, False, False]])
    # Sequence 0: valid & completion = t 1, 2 -> (1 + 2)/2 = 1.5.
    # Sequence 1: the only completion token (t = 0) is padding -> no token -> zeros.
    out = pool(tokens, valid, "completion_mean", completion)
    assert torch.allclose(out, torch.stack([_vec(1.5), _vec(0.0)]))


def test_pool_concat_hand():
    tokens, valid = _hand_batch()
    # n_valid = 3: floor(0.75) = 0, floor(1.5) = 1, floor(2.25) = 2 from the first valid token.
    # Sequence 0 starts at t = 0 -> tokens 0, 1, 2; sequence 1 starts at t = 1 -> tokens 1, 2, 3.
    out = pool(tokens, valid, "concat")
    expected = torch.stack(
        [
            torch.cat([_vec(0.0), _vec(1.0), _vec(2.0)]),
            torch.cat([_vec(11.0), _vec(12.0), _vec(13.0)]),
        ]
    )
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    ("n_valid", "expected"),
    [
        (8, [2, 4, 6]),  # 8/4 = 2, 8/2 = 4, 3*8/4 = 6
        (5, [1, 2, 3]),  # floor(1.25), floor(2.5), floor(3.75)
        (2, [0, 1, 1]),  # floor(0.5), floor(1.0), floor(1.5)
        (1, [0, 0, 0]),
    ],
)
def test_pool_concat_positions(n_valid, expected):
    # Token t carries the scalar t (E = 1), so the output spells out the chosen positions.
    # The valid span starts at t = 1 to check that positions count from the first valid token.
    tokens = torch.arange(10.0)[:, None]
    valid = torch.zeros(10, dtype=torch.bool)
    valid[1 : 1 + n_valid] = True
    out = pool(tokens, valid, "concat")
    assert out.tolist() == [1.0 + p for p in expected]


def _pool_oracle(tokens, valid, method, completion):
    """Row-by-row reference: plain Python indexing over one sequence at a time."""
    e = tokens.shape[-1]
    flat_t = tokens.reshape(-1, tokens.shape[-2], e)
    flat_v = valid.reshape(-1, valid.shape[-1])
    flat_c = completion.reshape(-1, completion.shape[-1])
    rows = []
    for tok, val, comp in zip(flat_t, flat_v, flat_c, strict=False):
        idx = [t for t in range(len(val)) if val[t]]
        if method == "last_token":
            rows.append(tok[idx[-1]])
        elif method == "mean_pooling":
            rows.append(sum(tok[t] for t in idx) / len(idx))
        elif method == "completion_mean":
            sel = [t for t in idx if comp[t]]
            rows.append(sum(tok[t] for t in sel) / len(sel) if sel else torch.zeros(e))
        else:
            rows.append(torch.cat([tok[idx[int(q * len(idx))]] for q in (0.25, 0.5, 0.75)]))
    return torch.stack(rows).reshape(*tokens.shape[:-2], -1)


@pytest.mark.parametrize("method", ["last_token", "mean_pooling", "completion_mean", "concat"])
def test_pool_matches_oracle_with_leading_dims(method):
    g = torch.Generator().manual_seed(3)
    lead, t_len, e = (2, 3), 9, 4
    tokens = torch.randn(*lead, t_len, e, generator=g)
    starts = torch.randint(0, 4, lead, generator=g)
    lengths = torch.randint(1, 6, lead, generator=g)
    pos = torch.arange(t_len)
    valid = (pos >= starts[..., None]) & (pos < (starts + lengths)[..., None])
    completion = torch.rand(*lead, t_len, generator=g) < 0.5
    out = pool(tokens, valid, method, completion)
    expected = _pool_oracle(tokens, valid, method, completion)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("length", [3, 1])  # 1: no position but 0 to read, even for an empty row
@pytest.mark.parametrize("method", ["last_token", "mean_pooling", "completion_mean", "concat"])
def test_pool_sequence_without_valid_tokens_is_zero(method, length):
    tokens = torch.ones(2, length, 2)
    valid = torch.zeros(2, length, dtype=torch.bool)
    valid[1, : max(1, length - 1)] = True  # row 0 has no valid token, row 1 one or two
    out = pool(tokens, valid, method, completion=torch.ones(2, length, dtype=torch.bool))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1], torch.ones_like(out[1]))


def test_pool_rejects_bad_arguments():
    tokens, valid = _hand_batch()
    with pytest.raises(ValueError, match="embed_method"):
        pool(tokens, valid, "max_pooling")
    with pytest.raises(ValueError, match="^embed_method 'completion_mean' needs a completion mask$"):
        pool(tokens, valid, "completion_mean")
    with pytest.raises(ValueError, match=r"completion must have shape \(2, 4\), got \(2, 3\)"):
        pool(tokens, valid, "completion_mean", completion=valid[:, :3])
    # tokens [2, 4, 2]: the message names the shape valid needs, the tokens' without the feature dim.
    with pytest.raises(ValueError, match=r"valid must have shape \(2, 4\), got \(2, 3\)"):
        pool(tokens, valid[:, :3], "last_token")
    gappy = torch.tensor([[True, False, True, False], [True, True, True, True]])
    with pytest.raises(ValueError, match="^embed_method 'concat' needs one contiguous valid span per sequence$"):
        pool(tokens, gappy, "concat")

"""The strided sampler: one uniform per row inverted through the row's cumulative distribution."""

import math

import torch

from ebft.sampling import invert_cdf, sample_tokens


def _first_above(probs: list[float], u: float) -> int:
    """Plain-Python oracle: the first token whose running total exceeds u * total."""
    total, running = sum(probs), 0.0
    for i, p in enumerate(probs):
        running += p
        if running > u * total:
            return i
    raise AssertionError("u * total reached the total")


def test_invert_cdf_matches_a_running_sum_over_each_row():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 11, generator=gen) * (torch.rand(64, 11, generator=gen) > 0.3)  # unnormalised, zeros
    probs[:, 4] += 0.01  # every row keeps some mass
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    got = invert_cdf(probs, u)
    want = [_first_above(row, float(x)) for row, x in zip(probs.double().tolist(), u.tolist(), strict=True)]
    assert got.tolist() == want


def test_invert_cdf_boundaries_and_zero_mass_tokens():
    # cdf of [0.5, 0.3, 0.2, 0] is [0.5, 0.8, 1.0, 1.0]: u = 0 -> token 0; u = 0.5 sits on token 0's upper
    # boundary, which belongs to token 1; u = 0.79 -> 1; u = 0.8 -> 2; u = 1 (the total itself) -> the last token
    # with mass (2), never the zero-mass token 3.
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).expand(5, -1)
    u = torch.tensor([0.0, 0.5, 0.79, 0.8, 1.0], dtype=torch.float64)
    assert invert_cdf(probs, u).tolist() == [0, 1, 1, 2, 2]


def test_sample_tokens_draws_the_tempered_truncated_distribution():
    # logits log([0.5, 0.3, 0.15, 0.05]) at temperature 1, top_p 0.9: the nucleus keeps the tokens whose mass
    # before them is < 0.9 (0, 0.5, 0.8 -> tokens 0, 1, 2), renormalised to 0.5/0.95, 0.3/0.95, 0.15/0.95.
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 40_000
    logits = p.log().expand(n, -1)
    draws = sample_tokens(logits, 1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    counts = torch.bincount(draws, minlength=4).tolist()
    assert counts[3] == 0
    for i, q in enumerate([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]):
        sigma = math.sqrt(q * (1 - q) / n)  # binomial standard error: at most 0.0025 here
        assert abs(counts[i] / n - q) < 5 * sigma, (i, counts)


def test_sample_tokens_is_reproducible_from_the_generator_and_keeps_the_batch_shape():
    logits = torch.randn(2, 3, 5, 17, generator=torch.Generator().manual_seed(1))
    a = sample_tokens(logits, 0.7, generator=torch.Generator().manual_seed(9))
    b = sample_tokens(logits, 0.7, generator=torch.Generator().manual_seed(9))
    assert a.shape == (2, 3, 5) and torch.equal(a, b)
    # One uniform per row, in row order: the draws are the oracle's inversion of those uniforms.
    u = torch.rand(30, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    probs = torch.softmax(logits.float() / 0.7, dim=-1).reshape(30, 17).double().tolist()
    assert a.reshape(-1).tolist() == [_first_above(row, float(x)) for row, x in zip(probs, u.tolist(), strict=True)]


def test_greedy_and_non_finite_rows():
    logits = torch.tensor([[0.1, 2.0, -1.0], [float("nan"), 0.0, 0.0]])
    assert sample_tokens(logits[:1], 0.0).tolist() == [1]
    # A row with a non-finite logit is drawn uniformly (the step's loss is then skipped); it still yields a token.
    drawn = sample_tokens(logits, 1.0, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (2,) and 0 <= int(drawn[1]) < 3

"""Whitening, rewards and advantages (ebft.rewards) against hand values and independent oracles."""

from __future__ import annotations

import math

import pytest
import torch

from ebft.rewards import RewardTerms, advantages, reward_terms, whiten


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _pinv_sqrt(a: torch.Tensor, rtol: float) -> torch.Tensor:
    """Oracle: (A^+)^{1/2} of a symmetric PSD matrix, materialised, via pinv then a matrix square root."""
    pinv = torch.linalg.pinv(a, hermitian=True, rtol=rtol)
    vals, vecs = torch.linalg.eigh(pinv)
    return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T


# The 1e-5 tolerance is on singular values of X, i.e. (1e-5)^2 on eigenvalues of X^T X or X X^T.
EIG_RTOL = 1e-10


def _terms(gen, gt, alignment_coef=1.0, diversity_coef=1.0, use_whitening=False, space="feature"):
    return reward_terms(
        gen,
        gt,
        alignment_coef=alignment_coef,
        diversity_coef=diversity_coef,
        use_whitening=use_whitening,
        whitening_space=space,
    )


# ---------------------------------------------------------------- whitening


@pytest.mark.parametrize("space", ["feature", "sample"])
def test_whitened_independent_samples_are_orthonormal(space):
    gen = _randn(3, 4, 16, seed=1).float()
    gt = _randn(3, 16, seed=2).float()
    gen_w, gt_w = whiten(gen, gt, space)
    assert gen_w.dtype == gt_w.dtype == torch.float32
    assert gen_w.shape == (3, 4, 16) and gt_w.shape == (3, 4, 16)
    gram = gen_w @ gen_w.mT
    assert torch.allclose(gram, torch.eye(4).expand(3, 4, 4), atol=1e-5)
    # Orthonormal rows -> every pairwise dot product, hence the diversity term, vanishes.
    terms = _terms(gen, gt, use_whitening=True, space=space)
    assert terms.diversity.abs().max() < 1e-5


@pytest.mark.parametrize("space", ["feature", "sample"])
def test_whitened_exact_duplicates(space):
    x = torch.tensor([3.0, 4.0, 0.0])
    gen = torch.stack([x, x])[None]  # [1, 2, 3]
    gt = torch.tensor([[1.0, 0.0, 0.0]])
    gen_w, _ = whiten(gen, gt, space)
    # X X^T = 25 [[1,1],[1,1]]: s = (0, 5 sqrt 2), the zero one dropped, u = [1,1]/sqrt 2.
    # M = u u^T / (5 sqrt 2) -> each row M X = (x + x)/2 / (5 sqrt 2) = x / (5 sqrt 2):
    # norm 5 / (5 sqrt 2) = 1/sqrt 2, dot 25 / 50 = 1/2.
    assert torch.allclose(gen_w.norm(dim=-1), torch.full((1, 2), 1 / math.sqrt(2)))
    assert torch.allclose((gen_w[0, 0] * gen_w[0, 1]).sum(), torch.tensor(0.5))
    # Diversity 2/(n-1) * <row 0, row 1> = 2 * 1/2 = 1: under whitening it acts as a duplicate penalty.
    terms = _terms(gen, gt, use_whitening=True, space=space)
    assert torch.allclose(terms.diversity, torch.ones(1, 2))


@pytest.mark.parametrize(
    ("eps", "dropped"),
    [(3e-6, True), (5e-5, True), (2e-4, False), (1e-3, False)],
)
def test_whitening_tolerance_is_relative_1e_5(eps, dropped):
    # X = [[3, 4, 0], [3, 4, eps]]: s_max * s_min = |x1 x x2| = |(4 eps, -3 eps, 0)| = 5 eps and
    # s_max^2 + s_min^2 = ||X||_F^2 = 50 + eps^2, so s_max ~ sqrt(50) and s_min / s_max ~ 5 eps / 50 = eps / 10:
    # 3e-7, 5e-6, 2e-5, 1e-4. The two middle cases sit within a factor 2 of the 1e-5 cut-off on either side,
    # so a cut-off of 1e-6 (keeps 5e-6) or 1e-4 (drops 2e-5) fails here.
    # Dropped: the pair whitens like an exact duplicate (every dot 1/2). Kept: orthonormal rows (dot 0, norms 1).
    gen = torch.tensor([[[3.0, 4.0, 0.0], [3.0, 4.0, eps]]])
    s = torch.linalg.svdvals(gen[0].double())
    assert float(s[1] / s[0]) == pytest.approx(eps / 10, rel=1e-3)  # the premise above
    gen_w, _ = whiten(gen, torch.ones(1, 3), "feature")
    gram = gen_w[0] @ gen_w[0].T
    expected = torch.full((2, 2), 0.5) if dropped else torch.eye(2)
    assert torch.allclose(gram, expected, atol=1e-4)


@pytest.mark.parametrize("space", ["feature", "sample"])
def test_whitening_cut_off_is_relative_to_each_groups_own_largest_singular_value(space):
    # Group 0 is the kept case above (s_min / s_max = 2e-5 > 1e-5, s_max ~ 7.07); group 1 is 1e3 times larger.
    # Measured against the batch's largest singular value (~7e3), group 0's s_min (~1.4e-4) would fall below
    # 1e-5 * 7e3 = 0.07 and be dropped; per group it is kept and the pair whitens to orthonormal rows.
    small = torch.tensor([[3.0, 4.0, 0.0], [3.0, 4.0, 2e-4]])
    large = 1e3 * _randn(2, 3, seed=30).float()
    gen_w, _ = whiten(torch.stack([small, large]), torch.ones(2, 3), space)
    assert torch.allclose(gen_w[0] @ gen_w[0].T, torch.eye(2), atol=1e-4)
    assert torch.allclose(gen_w[1] @ gen_w[1].T, torch.eye(2), atol=1e-4)


def test_whitened_gram_is_projector_with_a_duplicate():
    # Rows: x, x, z (z not orthogonal to x). X X^T has rank 2 with range span{e1 + e2, e3}, and the
    # whitened Gram U_k U_k^T is the orthogonal projector onto it.
    x = torch.tensor([1.0, 2.0, 0.0, 1.0])
    z = torch.tensor([0.5, -1.0, 3.0, 0.0])
    gen = torch.stack([x, x, z])[None]
    gen_w, _ = whiten(gen, torch.ones(1, 4), "feature")
    projector = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(gen_w[0] @ gen_w[0].T, projector, atol=1e-6)


@pytest.mark.parametrize("duplicate", [False, True])
def test_feature_space_matches_explicit_d_space_operator(duplicate):
    x = _randn(3, 5, seed=4)
    if duplicate:
        x[2] = x[0]
    gt = _randn(5, seed=5)
    # Paper eq. 8: W = (Sigma^+)^{1/2} with Sigma = X^T X, a materialised E x E matrix.
    w = _pinv_sqrt(x.T @ x, EIG_RTOL)
    gen_w, gt_w = whiten(x[None].float(), gt[None].float(), "feature")
    assert torch.allclose(gen_w[0].double(), x @ w, atol=1e-5)
    assert torch.allclose(gt_w[0].double(), (gt @ w).expand(3, 5), atol=1e-5)
    # feature space (paper eq. 8) is the default
    default_w, default_gt = whiten(x[None].float(), gt[None].float())
    assert torch.equal(default_w, gen_w) and torch.equal(default_gt, gt_w)


def test_sample_space_matches_explicit_row_operator():
    x = _randn(4, 6, seed=6)
    gt = _randn(6, seed=7)
    m = _pinv_sqrt(x @ x.T, EIG_RTOL)  # n x n, (X X^T)^{+1/2}
    y = gt.expand(4, 6)  # n identical copies of the ground truth
    gen_w, gt_w = whiten(x[None].float(), gt[None].float(), "sample")
    assert torch.allclose(gen_w[0].double(), m @ x, atol=1e-5)
    assert torch.allclose(gt_w[0].double(), m @ y, atol=1e-5)
    # The samples whiten the same in both spaces; only the ground truth differs.
    gen_f, gt_f = whiten(x[None].float(), gt[None].float(), "feature")
    assert torch.allclose(gen_f, gen_w, atol=1e-5)
    assert not torch.allclose(gt_f, gt_w, atol=1e-2)


def test_sample_space_alignment_is_signed_cosine_with_raw_gt():
    x = _randn(1, 5, 8, seed=17).float()
    gt = _randn(1, 8, seed=9).float()
    m = _pinv_sqrt(x[0].double() @ x[0].double().T, EIG_RTOL)
    assert (m.sum(-1) < 0).any() and (m.sum(-1) > 0).any()  # seed chosen so both signs occur
    gen_w, _ = whiten(x, gt, "sample")
    # gt_w[i] = (sum_j M_ij) * gt, so cos(gen_w_i, gt_w_i) = sign(sum_j M_ij) * cos(gen_w_i, gt).
    cos_raw = torch.nn.functional.cosine_similarity(gen_w[0], gt[0].expand(5, 8), dim=-1)
    expected = 2 * torch.sign(m.sum(-1)).float() * cos_raw
    terms = _terms(x, gt, use_whitening=True, space="sample")
    assert torch.allclose(terms.alignment[0], expected, atol=1e-5)


@pytest.mark.parametrize("space", ["feature", "sample"])
def test_whiten_zero_group_gives_zeros(space):
    gen = torch.zeros(2, 3, 4)
    gen[1] = _randn(3, 4, seed=10).float()
    gt = torch.ones(2, 4)
    gen_w, gt_w = whiten(gen, gt, space)
    assert torch.isfinite(gen_w).all() and torch.isfinite(gt_w).all()
    assert torch.equal(gen_w[0], torch.zeros(3, 4)) and torch.equal(gt_w[0], torch.zeros(3, 4))
    assert torch.allclose(gen_w[1] @ gen_w[1].T, torch.eye(3), atol=1e-5)  # other group unaffected


@pytest.mark.parametrize("space", ["feature", "sample"])
def test_whiten_groups_independent_and_order_equivariant(space):
    gen = _randn(3, 4, 6, seed=11).float()
    gt = _randn(3, 6, seed=12).float()
    gen_w, gt_w = whiten(gen, gt, space)
    for g in range(3):
        one_w, one_gt = whiten(gen[g : g + 1], gt[g : g + 1], space)
        assert torch.allclose(one_w[0], gen_w[g], atol=1e-6)
        assert torch.allclose(one_gt[0], gt_w[g], atol=1e-6)
    perm = torch.tensor([2, 0, 3, 1])
    perm_w, perm_gt = whiten(gen[:, perm], gt, space)
    assert torch.allclose(perm_w, gen_w[:, perm], atol=1e-5)
    assert torch.allclose(perm_gt, gt_w[:, perm], atol=1e-5)


def test_whiten_rejects_bad_input():
    with pytest.raises(ValueError, match="whitening_space"):
        whiten(torch.ones(1, 2, 3), torch.ones(1, 3), "row")
    with pytest.raises(ValueError, match=r"\[G, n, E\]"):
        whiten(torch.ones(1, 2, 3), torch.ones(2, 3), "feature")


# ---------------------------------------------------------------- rewards


def _hand_example() -> RewardTerms:
    # gen 0 = [3,4] -> unit [0.6, 0.8]; gen 1 = [0,2] -> [0, 1]; gt = [2,0] -> [1, 0].
    gen = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])
    gt = torch.tensor([[2.0, 0.0]])
    return _terms(gen, gt, alignment_coef=1.0, diversity_coef=0.5)


def test_reward_terms_hand_example():
    terms = _hand_example()
    # alignment = 2 cos: 2 * 0.6 = 1.2 and 2 * 0 = 0.
    assert torch.allclose(terms.alignment, torch.tensor([[1.2, 0.0]]))
    # diversity = 2/(n-1) * <g0, g1> = 2/1 * 0.8 = 1.6 for both.
    assert torch.allclose(terms.diversity, torch.tensor([[1.6, 1.6]]))
    # reward = 1.0 * a - 0.5 * d: 1.2 - 0.8 = 0.4 and 0 - 0.8 = -0.8.
    assert torch.allclose(terms.reward, torch.tensor([[0.4, -0.8]]))
    # cfm: mean gen = [0.3, 0.9]; minus gt [1, 0] = [-0.7, 0.9]; 0.49 + 0.81 = 1.30.
    assert torch.allclose(terms.cfm, torch.tensor([1.30]))


def test_reward_terms_n3_hand_example():
    # Unit vectors e1, e2, (e1 + e2)/sqrt 2 with gt = e1; s = 1/sqrt 2.
    s = 1 / math.sqrt(2)
    gen = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [s, s]]])
    gt = torch.tensor([[1.0, 0.0]])
    terms = _terms(gen, gt, alignment_coef=2.0, diversity_coef=1.0)
    # Dots: <g0,g1> = 0, <g0,g2> = s, <g1,g2> = s. diversity_i = 2/2 * (sum over the others):
    # d0 = 0 + s, d1 = 0 + s, d2 = s + s.
    assert torch.allclose(terms.diversity, torch.tensor([[s, s, 2 * s]]))
    # alignment: 2 * (1, 0, s).
    assert torch.allclose(terms.alignment, torch.tensor([[2.0, 0.0, 2 * s]]))
    # reward = 2 a - d: 4 - s, -s, 4 s - 2 s = 2 s.
    assert torch.allclose(terms.reward, torch.tensor([[4 - s, -s, 2 * s]]))
    # cfm: mean gen = [(1 + s)/3, (1 + s)/3]; minus [1, 0] -> ((s - 2)/3)^2 + ((1 + s)/3)^2.
    assert torch.allclose(terms.cfm, torch.tensor([((s - 2) / 3) ** 2 + ((1 + s) / 3) ** 2]))


def test_reward_terms_unit_vectors_match_u_statistic():
    n, e = 5, 7
    phi = torch.nn.functional.normalize(_randn(n, e, seed=13), dim=-1)
    y = torch.nn.functional.normalize(_randn(e, seed=14), dim=0)
    terms = _terms(phi[None].float(), y[None].float())
    # Unbiased U-statistic of ||E phi - y||^2, written out pair by pair (||y|| = 1).
    pairs = sum(float(phi[i] @ phi[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    cross = sum(float(phi[i] @ y) for i in range(n)) / n
    u_stat = pairs - 2 * cross + 1.0
    estimate = 1 - (terms.alignment - terms.diversity / 2).mean()
    assert estimate.item() == pytest.approx(u_stat, abs=1e-5)
    # The logged cfm is the plug-in estimate, which also counts the i == j pairs.
    plug_in = sum(float(phi[i] @ phi[j]) for i in range(n) for j in range(n)) / n**2 - 2 * cross + 1.0
    assert terms.cfm.item() == pytest.approx(plug_in, abs=1e-5)


def test_reward_terms_normalises_without_whitening():
    gen = _randn(2, 3, 4, seed=15).float()
    gt = _randn(2, 4, seed=16).float()
    scaled = _terms(gen * torch.tensor([[[0.1], [10.0], [3.0]]]), gt * 7.0)
    plain = _terms(gen, gt)
    for name in ("alignment", "diversity", "reward", "cfm"):
        assert torch.allclose(getattr(scaled, name), getattr(plain, name), atol=1e-5)


def test_reward_terms_whitened_feature_space_hand_example():
    # X = [[2, 0, 0], [0, 1, 0]] is already orthogonal: s = (2, 1), Vh = [e1, e2], W = diag(1/2, 1, 0).
    gen = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    gt = torch.tensor([[1.0, 1.0, 1.0]])
    gen_w, gt_w = whiten(gen, gt, "feature")
    # gen W = [[1, 0, 0], [0, 1, 0]]; gt W = [1/2, 1, 0] (the e3 part lies outside the span).
    assert torch.allclose(gen_w[0], torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.allclose(gt_w[0], torch.tensor([[0.5, 1.0, 0.0], [0.5, 1.0, 0.0]]))
    terms = _terms(gen, gt, use_whitening=True)
    # |gt W| = sqrt(1/4 + 1) = sqrt(5)/2; cosines 0.5 / (sqrt 5 / 2) = 1/sqrt 5 and 1/(sqrt 5/2) = 2/sqrt 5.
    r5 = math.sqrt(5.0)
    assert torch.allclose(terms.alignment, torch.tensor([[2 / r5, 4 / r5]]))
    assert torch.allclose(terms.diversity, torch.zeros(1, 2))
    # cfm: mean gen_w = [1/2, 1/2, 0]; minus [1/2, 1, 0] -> [0, -1/2, 0]; 1/4.
    assert torch.allclose(terms.cfm, torch.tensor([0.25]))


def test_reward_terms_single_sample():
    gen = torch.tensor([[[0.0, 3.0]]])
    gt = torch.tensor([[0.0, 1.0]])
    for whitening in (False, True):
        terms = _terms(gen, gt, use_whitening=whitening)
        assert torch.equal(terms.diversity, torch.zeros(1, 1))
        assert torch.allclose(terms.alignment, torch.tensor([[2.0]]))  # cos = 1


# ---------------------------------------------------------------- advantages


def test_advantages_hand_example():
    terms = _hand_example()  # a = [1.2, 0], d = [1.6, 1.6], r = [0.4, -0.8], alpha = 1, beta = 0.5
    # rloo, n = 2: alignment baseline = the other's a -> (0, 1.2); diversity baseline = 0.
    # A0 = (1.2 - 0) - 0.5 * 1.6 = 0.4; A1 = (0 - 1.2) - 0.5 * 1.6 = -2.0.
    assert torch.allclose(advantages(terms, "rloo", 1.0, 0.5), torch.tensor([[0.4, -2.0]]))
    # group_norm: mean -0.2, deviations +-0.6, unbiased std sqrt(0.72 / 1) = 0.8485.
    std = math.sqrt(0.72)
    expected = torch.tensor([[0.6, -0.6]]) / (std + 1e-6)
    assert torch.allclose(advantages(terms, "group_norm", 1.0, 0.5), expected)
    assert torch.allclose(advantages(terms, "reinforce", 1.0, 0.5), torch.tensor([[0.4, -0.8]]))


def test_group_norm_is_per_group_hand_values():
    # Rewards alone decide group_norm, each group with its own mean and unbiased std.
    # Group 0: mean 2, centred (-1, 0, 1), std sqrt(2 / 2) = 1.
    # Group 1: mean 12, centred (-2, -2, 4), std sqrt((4 + 4 + 16) / 2) = sqrt(12).
    # Group 2, nearly constant: centred (-1/3, 2/3, -1/3) * 1e-6, std sqrt((1/9 + 4/9 + 1/9) / 2) * 1e-6 =
    # 5.774e-7, so the 1e-6 guard keeps it small: middle 6.667e-7 / (5.774e-7 + 1e-6) = 0.4226.
    reward = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 16.0], [0.0, 1e-6, 0.0]])
    zeros = torch.zeros(3, 3)
    terms = RewardTerms(alignment=zeros, diversity=zeros, reward=reward, cfm=torch.zeros(3))
    got = advantages(terms, "group_norm", 1.0, 1.0)
    torch.testing.assert_close(got[0], torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-6))
    torch.testing.assert_close(got[1], torch.tensor([-2.0, -2.0, 4.0]) / (math.sqrt(12) + 1e-6))
    third = torch.tensor([-1 / 3, 2 / 3, -1 / 3]) * 1e-6 / (math.sqrt(1 / 3) * 1e-6 + 1e-6)
    torch.testing.assert_close(got[2], third, atol=1e-4, rtol=1e-3)
    assert float(got[2, 1]) == pytest.approx(0.4226, abs=1e-3)


def _baselines(terms, alpha, beta):
    return terms.reward - advantages(terms, "rloo", alpha, beta)


def test_rloo_baseline_does_not_depend_on_own_sample():
    gen = _randn(2, 5, 6, seed=17).float()
    gt = _randn(2, 6, seed=18).float()
    base = _baselines(_terms(gen, gt, 1.0, 0.7), 1.0, 0.7)
    for i in range(5):
        moved = gen.clone()
        moved[:, i] = _randn(2, 6, seed=100 + i).float()
        terms = _terms(moved, gt, 1.0, 0.7)
        new_base = _baselines(terms, 1.0, 0.7)
        assert torch.allclose(new_base[:, i], base[:, i], atol=1e-5)
        # ... while the baselines of the others do move (the test would notice a constant baseline).
        others = [j for j in range(5) if j != i]
        assert not torch.allclose(new_base[:, others], base[:, others], atol=1e-3)


def test_rloo_baselines_equal_leave_one_out_recomputation():
    n = 5
    gen = _randn(1, n, 6, seed=19).float()
    gt = _randn(1, 6, seed=20).float()
    terms = _terms(gen, gt)
    # With (alpha, beta) = (0, 1), A = -(d - base_d); with (1, 0), A = a - base_a.
    base_d = terms.diversity + advantages(terms, "rloo", 0.0, 1.0)
    base_a = terms.alignment - advantages(terms, "rloo", 1.0, 0.0)
    for i in range(n):
        keep = [j for j in range(n) if j != i]
        without_i = _terms(gen[:, keep], gt)  # the group of the other n - 1 samples, recomputed
        assert base_d[0, i].item() == pytest.approx(without_i.diversity.mean().item(), abs=1e-5)
        assert base_a[0, i].item() == pytest.approx(without_i.alignment.mean().item(), abs=1e-5)


def test_rloo_advantages_sum_to_zero():
    terms = _terms(_randn(3, 4, 5, seed=21).float(), _randn(3, 5, seed=22).float(), 1.0, 0.5)
    assert torch.allclose(advantages(terms, "rloo", 1.0, 0.5).sum(-1), torch.zeros(3), atol=1e-5)


@pytest.mark.parametrize("whitening", [False, True])
def test_identical_samples_give_zero_rloo_advantages(whitening):
    x = _randn(6, seed=23).float()
    gen = x.expand(1, 4, 6).clone()
    terms = _terms(gen, _randn(1, 6, seed=24).float(), use_whitening=whitening)
    assert torch.allclose(advantages(terms, "rloo", 1.0, 1.0), torch.zeros(1, 4), atol=1e-5)
    assert torch.allclose(advantages(terms, "group_norm", 1.0, 1.0), torch.zeros(1, 4), atol=1e-5)


def test_rloo_n2_has_no_diversity_baseline():
    terms = _terms(_randn(2, 2, 5, seed=25).float(), _randn(2, 5, seed=26).float())
    # base_d = 0 for n = 2, so with alpha = 0, beta = 1 the advantage is exactly -d.
    assert torch.equal(advantages(terms, "rloo", 0.0, 1.0), -terms.diversity)


@pytest.mark.parametrize("estimator", ["rloo", "group_norm", "reinforce"])
def test_single_sample_falls_back_to_reinforce(estimator):
    terms = _terms(_randn(3, 1, 4, seed=27).float(), _randn(3, 4, seed=28).float(), 1.5, 1.0)
    out = advantages(terms, estimator, 1.5, 1.0)
    assert torch.isfinite(out).all()
    assert torch.equal(out, terms.reward)
    assert torch.allclose(out, 1.5 * terms.alignment)  # diversity is 0 with one sample


def test_advantages_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="advantage_estimator"):
        advantages(_hand_example(), "ppo", 1.0, 1.0)

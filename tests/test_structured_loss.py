"""The structured loss pieces against hand arithmetic (docs/design.md §6): group advantages, the clipped
surrogate and its clip flags, and every loss aggregation.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from ebft import losses, rewards


def test_group_advantages_hand_values():
    reward = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    # Group means 2 and 2: centred [[-1, 0, 1], [-2, -2, 4]].
    # Unbiased stds: sqrt((1 + 0 + 1) / 2) = 1 and sqrt((4 + 4 + 16) / 2) = sqrt(12) = 3.464102.
    centred = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, -2.0, 4.0]])
    group = rewards.group_advantages(reward, "group")
    torch.testing.assert_close(group[0], centred[0] / 1.0001)
    torch.testing.assert_close(group[1], centred[1] / (math.sqrt(12) + 1e-4))
    torch.testing.assert_close(rewards.group_advantages(reward, "batch", 2.0), centred / 2.0001)
    torch.testing.assert_close(rewards.group_advantages(reward, "none"), centred)
    # A constant group has std 0: advantages 0, not NaN.
    assert rewards.group_advantages(torch.tensor([[5.0, 5.0]]), "group").tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="^scale_rewards 'batch' needs the batch standard deviation$"):
        rewards.group_advantages(reward, "batch")
    with pytest.raises(
        ValueError, match=r"unknown scale_rewards 'token'; expected one of \('group', 'batch', 'none'\)"
    ):
        rewards.group_advantages(reward, "token")


def test_clipped_surrogate_hand_values():
    ratios = torch.tensor([0.5, 1.1, 1.5, 0.5, 1.1, 1.5], dtype=torch.float64)
    adv = torch.tensor([2.0, 2.0, 2.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -2.5], dtype=torch.float64)
    logp = (old + ratios.log()).requires_grad_(True)
    sur = losses.clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    # clip range [0.8, 1.28]; loss = -min(r A, clip(r) A):
    #   r 0.5, A  2: -min(1.0, 0.8 * 2 = 1.6)    = -1.0   (unclipped side is smaller: gradient flows)
    #   r 1.1, A  2: -min(2.2, 2.2)              = -2.2
    #   r 1.5, A  2: -min(3.0, 1.28 * 2 = 2.56)  = -2.56  (high clip binds: no gradient)
    #   r 0.5, A -1: -min(-0.5, 0.8 * -1 = -0.8) = 0.8    (low clip binds: no gradient)
    #   r 1.1, A -1: -min(-1.1, -1.1)            = 1.1
    #   r 1.5, A -1: -min(-1.5, 1.28 * -1)       = 1.5    (unclipped side is smaller)
    torch.testing.assert_close(sur.loss.detach(), torch.tensor([-1.0, -2.2, -2.56, 0.8, 1.1, 1.5], dtype=torch.float64))
    torch.testing.assert_close(sur.ratio, ratios)
    assert sur.low_clipped.tolist() == [False, False, False, True, False, False]
    assert sur.high_clipped.tolist() == [False, False, True, False, False, False]
    # d loss / d logp = -A r on the unclipped side (d r / d logp = r), 0 where a bound binds:
    #   -2 * 0.5 = -1.0, -2 * 1.1 = -2.2, 0, 0, 1 * 1.1 = 1.1, 1 * 1.5 = 1.5
    (grad,) = torch.autograd.grad(sur.loss.sum(), logp)
    torch.testing.assert_close(grad, torch.tensor([-1.0, -2.2, 0.0, 0.0, 1.1, 1.5], dtype=torch.float64))

    # An importance weight multiplies the token loss (and its gradient).
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0], dtype=torch.float64)
    weighted = losses.clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28, weight=w)
    # -1.0 * 1, -2.2 * 2, -2.56 * 0.5, 0.8 * 1, 1.1 * 3, 1.5 * 1
    torch.testing.assert_close(
        weighted.loss.detach(), torch.tensor([-1.0, -4.4, -1.28, 0.8, 3.3, 1.5], dtype=torch.float64)
    )

    # On-policy (old = logp.detach()): ratio 1, nothing clipped, loss -A, gradient -A (REINFORCE).
    on = losses.clipped_surrogate(logp, logp.detach(), adv, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(on.loss.detach(), -adv)
    assert not on.low_clipped.any() and not on.high_clipped.any()
    (grad,) = torch.autograd.grad(on.loss.sum(), logp)
    torch.testing.assert_close(grad, -adv)


@pytest.mark.parametrize(
    ("eps_low", "eps_high", "n_low", "n_high"),
    [
        # bounds [0.8, 1.28]: r = e^-0.7 ~ 0.50 is below with A = -2, -0.5 (2 tokens); e^0.7 ~ 2.01 above
        # with A = 0.5, 2 (2 tokens); e^-0.1 ~ 0.90 and e^0.1 ~ 1.11 lie inside.
        (0.2, 0.28, 2, 2),
        # bounds [1, 1]: r = e^0 = 1 lies exactly on both; the four ratios r != 1 are outside, each with two
        # advantages of the binding sign: 4 low, 4 high.
        (0.0, 0.0, 4, 4),
    ],
)
def test_clip_flags_mark_exactly_the_tokens_whose_gradient_the_clip_removes(eps_low, eps_high, n_low, n_high):
    # Oracle: autograd. A token counts as clipped when its advantage is non-zero and the clip leaves it no
    # gradient. A ratio exactly on a bound still passes gradient (-A r), so it is not clipped; with A = 0
    # there is no gradient at any ratio, and no clip to blame for it.
    log_r = torch.tensor([-0.7, -0.1, 0.0, 0.1, 0.7], dtype=torch.float64)
    adv_values = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], dtype=torch.float64)
    shift, adv = (t.reshape(-1) for t in torch.meshgrid(log_r, adv_values, indexing="ij"))
    old = torch.linspace(-3.0, -0.5, shift.numel(), dtype=torch.float64)
    logp = (old + shift).requires_grad_(True)
    sur = losses.clipped_surrogate(logp, old, adv, eps_low=eps_low, eps_high=eps_high)
    (grad,) = torch.autograd.grad(sur.loss.sum(), logp)
    no_gradient = grad == 0
    assert torch.equal(sur.low_clipped, no_gradient & (adv < 0))
    assert torch.equal(sur.high_clipped, no_gradient & (adv > 0))
    assert (int(sur.low_clipped.sum()), int(sur.high_clipped.sum())) == (n_low, n_high)
    # On a bound (r = 1 with eps = 0) the gradient is the unclipped -A r = -A.
    on_bound = (shift == 0) & (adv != 0)
    if eps_low == 0.0:
        torch.testing.assert_close(grad[on_bound], -adv[on_bound])


def test_aggregate_hand_values():
    # Two completions: tokens (1, 3) and (2, 4, 6). Sum 16 over 5 tokens.
    token_loss = torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0])
    seq = torch.tensor([0, 0, 1, 1, 1])
    norm = losses.LossNorm(sequences=2, tokens=5, max_completion_length=4, micro_batches=1)
    # grpo: per-completion means 2 and 4, averaged over 2 completions = 3
    assert float(losses.aggregate(token_loss, seq, 2, "grpo", norm)) == pytest.approx(3.0)
    # dapo: 16 / 5 tokens = 3.2
    assert float(losses.aggregate(token_loss, seq, 2, "dapo", norm)) == pytest.approx(3.2)
    # dr_grpo: 16 / (2 completions * max_completion_length 4) = 2.0
    assert float(losses.aggregate(token_loss, seq, 2, "dr_grpo", norm)) == pytest.approx(2.0)
    # bnpo: 16 / 5 tokens of this micro-batch / 1 micro-batch = 3.2
    assert float(losses.aggregate(token_loss, seq, 2, "bnpo", norm)) == pytest.approx(3.2)

    # The same step split into one micro-batch per completion (step-global norms, 2 micro-batches).
    split = replace(norm, micro_batches=2)
    first = (token_loss[:2], torch.tensor([0, 0]))
    second = (token_loss[2:], torch.tensor([0, 0, 0]))

    def total(kind):
        return sum(float(losses.aggregate(t, i, 1, kind, split)) for t, i in (first, second))

    assert total("grpo") == pytest.approx(3.0)  # 2 / 2 + 4 / 2
    assert total("dapo") == pytest.approx(3.2)  # 4 / 5 + 12 / 5
    assert total("dr_grpo") == pytest.approx(2.0)  # 4 / 8 + 12 / 8
    assert total("bnpo") == pytest.approx(3.0)  # (4 / 2) / 2 + (12 / 3) / 2: bnpo depends on the split
    with pytest.raises(ValueError, match="unknown loss_type"):
        losses.aggregate(token_loss, seq, 2, "ppo", norm)


def test_aggregate_one_token_and_completions_without_tokens():
    # The smallest step: one completion of one token, every denominator 1, so each type gives the token's loss.
    one = losses.LossNorm(sequences=1, tokens=1, max_completion_length=1, micro_batches=1)
    for kind in ("grpo", "dapo", "dr_grpo", "bnpo"):
        assert float(losses.aggregate(torch.tensor([2.5]), torch.tensor([0]), 1, kind, one)) == 2.5, kind
    # grpo over 3 completions: (1 token: 4), (2 tokens: 1, 3), and a masked one with no loss token, which
    # still counts as a completion of mean 0: (4 / 1 + 4 / 2 + 0) / 3 = 2.
    norm = losses.LossNorm(sequences=3, tokens=3, max_completion_length=4, micro_batches=1)
    got = losses.aggregate(torch.tensor([4.0, 1.0, 3.0]), torch.tensor([0, 1, 1]), 3, "grpo", norm)
    assert float(got) == pytest.approx(2.0)

"""The frozen-head log-prob path (gradient taken in the forward pass) against plain autograd."""

from __future__ import annotations

import pytest
import torch

from ebft.losses import token_logprobs
from ebft.sampling import truncation_keep


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k", "min_p"),
    # temperature 0 (greedy sampling) is scored untempered, like 1; 2.0 is a temperature above 1.
    [(1.0, 1.0, 0, 0.0), (0.7, 0.9, 0, 0.0), (1.3, 1.0, 5, 0.05), (0.0, 1.0, 0, 0.0), (2.0, 1.0, 0, 0.0)],
)
def test_frozen_head_gradient_and_values_equal_autograd(temperature, top_p, top_k, min_p):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    head.weight.requires_grad_(False)
    hidden = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 40, (9,))
    weights = torch.linspace(-1.0, 2.0, 9)  # every row's gradient weighed differently

    kw = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}
    logp, entropy = token_logprobs(hidden, targets, head, chunk_size=4, with_entropy=True, **kw)
    (weights * logp).sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None

    # Oracle: plain autograd through logits / T, the truncation mask (a constant) and log_softmax.
    z = head(hidden) / (temperature if temperature > 0 else 1.0)
    keep = truncation_keep(z.detach(), top_p, top_k, min_p)
    keep[torch.arange(9), targets] = True
    want_all = z.masked_fill(~keep, float("-inf")).log_softmax(-1)
    want = want_all.gather(-1, targets[:, None]).squeeze(-1)
    (weights * want).sum().backward()
    torch.testing.assert_close(logp, want.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(got, hidden.grad, atol=1e-5, rtol=1e-5)
    p = want_all.detach().exp()
    torch.testing.assert_close(entropy, -(p * want_all.detach().masked_fill(p == 0, 0)).sum(-1), atol=1e-5, rtol=0)


def test_trainable_head_keeps_its_gradient():
    """A head that trains (full fine-tuning) goes through autograd: its weight gets a gradient."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 12, bias=False)
    hidden = torch.randn(5, 8, requires_grad=True)
    token_logprobs(hidden, torch.arange(5), head).sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0

"""The frozen-head log-prob path (gradient taken in the forward pass) against plain autograd."""

from __future__ import annotations

import math

import pytest
import torch

from ebft.losses import token_logprobs
from ebft.modeling.parts import ScaledHead
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


def test_top_k_one_scores_the_token_it_keeps_with_probability_one():
    # An identity head, so each hidden row is its logits. top_k = 1 keeps the argmax (and the drawn token):
    #   row 0 [2, 0, 0, -1], target 0 = the argmax: the only kept token, log p = log 1 = 0.
    #   row 1 [2, 1, 0, 0], target 1: kept {0, 1}, log p = 1 - log(e^2 + e^1) = -1 - log(1 + e^-1) = -1.31326.
    head = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(4))
    hidden = torch.tensor([[2.0, 0.0, 0.0, -1.0], [2.0, 1.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1])
    want = torch.tensor([0.0, -1.0 - math.log(1.0 + math.exp(-1.0))])
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(hidden, targets, head, top_k=1), want)
    head.weight.requires_grad_(False)  # the frozen-head path, which takes its gradient in the forward
    got = token_logprobs(hidden.clone().requires_grad_(True), targets, head, top_k=1)
    torch.testing.assert_close(got.detach(), want)


def test_soft_capped_head_with_the_default_chunking():
    # Gemma-2's head (ScaledHead: cap * tanh(W h / cap)) has no .weight to size chunks by; it still scores
    # exactly what log_softmax of its logits gives.
    torch.manual_seed(0)
    head = ScaledHead(torch.nn.Linear(16, 40, bias=False), scale=1.0, cap=3.0)
    hidden = torch.randn(9, 16)
    targets = torch.randint(0, 40, (9,))
    with torch.no_grad():
        want = (3.0 * torch.tanh(head.head(hidden) / 3.0)).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        torch.testing.assert_close(token_logprobs(hidden, targets, head), want)


def test_default_chunks_hold_one_logits_tensor_of_about_64_mib():
    # A vocabulary of 2^15: CHUNK_ELEMENTS (2^24) / 2^15 = 512 rows per head call, so 513 rows take two
    # calls (512 + 1), each [rows, 2^15] fp32 logits of at most 512 * 2^15 * 4 B = 64 MiB.
    head = torch.nn.Linear(1, 1 << 15, bias=False)
    rows = []
    head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    with torch.no_grad():
        token_logprobs(torch.randn(513, 1), torch.zeros(513, dtype=torch.long), head)
    assert rows == [512, 1]


def test_no_rows_give_empty_float32_log_probs_and_entropies():
    head = torch.nn.Linear(8, 16).to(torch.bfloat16)
    logp, entropy = token_logprobs(
        torch.zeros(0, 8, dtype=torch.bfloat16), torch.zeros(0, dtype=torch.long), head, with_entropy=True
    )
    assert (logp.shape, logp.dtype, entropy.shape, entropy.dtype) == ((0,), torch.float32, (0,), torch.float32)

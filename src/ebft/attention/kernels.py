"""Attention over an explicit boolean mask, honouring what a decoder layer asks for (docs/design.md §7.1).

transformers' attention modules hand their attention function the layer's own ``scaling`` (e.g.
Gemma's ``query_pre_attn_scalar``), its ``sliding_window`` (None on global layers) and, for Gemma-2,
``softcap`` (``attn_logit_softcapping``). Grouped-query attention shows as fewer key/value heads than
query heads. Everything here is pure tensor math on [D, H, Q, d] queries and [D, H_kv, K, d] keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[D, Q] and [D, K] position ids -> [D, 1, Q, K] bool: key within the query's sliding window.

    transformers' rule (``masking_utils.sliding_window_overlay``) is ``kv > q - window`` on the
    positions of the sequence the model sees. In a packed strided row a generated token's position is
    c_k + t, not its packed index, so the rule is applied to position ids.
    """
    return ((q_pos[:, :, None] - k_pos[:, None, :]) < window)[:, None]


def causal_window_mask(length: int, window: int | None, device) -> torch.Tensor:
    """[1, 1, L, L] bool: plain causal, further limited to the last ``window`` keys when given."""
    i = torch.arange(length, device=device)
    diff = i[:, None] - i[None, :]
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    return mask[None, None]


def softcap(scores: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma-2's logit soft-capping: cap * tanh(scores / cap), applied before masking and softmax."""
    return torch.tanh(scores / cap) * cap


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scaling: float | None,
    softcap_value: float | None = None,
    dropout: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """query [D, H, Q, d], key/value [D, H_kv, K, d], mask [D or 1, 1, Q, K] bool (True = attend) -> [D, H, Q, d].

    Without soft-capping this is SDPA (a boolean mask, never handed to eager attention). Soft-capping
    sits between the scaled scores and the softmax, which SDPA cannot express, so that case is computed
    explicitly, in the same order as transformers' eager Gemma-2 attention (fp32 softmax).
    """
    if softcap_value is None:
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=is_causal,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
    groups = query.shape[1] // key.shape[1]
    # Query head h uses key/value head h // groups (transformers' repeat_kv).
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = softcap(torch.matmul(query, key.transpose(-1, -2)) * scale, softcap_value)
    if is_causal:
        mask = causal_window_mask(query.shape[2], None, query.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.float().softmax(dim=-1).to(query.dtype)
    if dropout > 0:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, value)

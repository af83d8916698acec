"""Turning hidden states of the frozen feature network into one vector per block (docs/design.md §5).

Three pure steps, torch only:

1. ``layer_indices``: which entries of ``output_hidden_states`` to read (0 = embedding output).
2. ``combine_layers``: normalise and concatenate the chosen layers token by token.
3. ``pool``: reduce the tokens of a block (or completion) to a single embedding.

Shape letters: T tokens, H hidden size of one layer, F number of chosen layers, E = F * H.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ebft.choices import FEATURE_NORMS, POOL_METHODS, FeatureNorm, PoolMethod

# Norms below this count as zero; a zero vector is left at zero instead of becoming NaN.
_NORM_EPS = 1e-12

# Quartile positions read by ``concat``, as fractions k/4 of the valid span (kept as integers so
# that floor(q * n) is exact).
_CONCAT_QUARTERS = (1, 2, 3)


def layer_indices(fractions: Sequence[float], num_layers: int) -> list[int]:
    """Hidden-state indices for layer fractions: ``int(f * num_layers)`` for each ``f``.

    Index 0 is the embedding output and ``num_layers`` the last layer, following the
    ``hidden_states`` tuple of Hugging Face models (which has ``num_layers + 1`` entries).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    out = []
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"feature layer fraction must lie in [0, 1], got {f}")
        out.append(int(f * num_layers))
    return out


def _l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last dim; the norm is taken in float32 so fp16/bf16 cannot overflow."""
    norm = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    return (x.float() / norm).to(x.dtype)


def combine_layers(hidden: Sequence[torch.Tensor], norm: FeatureNorm = "per_layer") -> torch.Tensor:
    """Concatenate per-token features of several layers.

    hidden: F tensors of identical shape ``[..., H]`` (one per chosen layer).
    norm: ``per_layer`` L2-normalises each layer's vector per token before concatenation, so every
    layer contributes equally; ``joint`` normalises the concatenation (the paper code, where the
    layer with the largest norm dominates); ``none`` only concatenates.
    Returns ``[..., F * H]`` in the input dtype.
    """
    if norm not in FEATURE_NORMS:
        raise ValueError(f"unknown feature_norm {norm!r}; expected one of {FEATURE_NORMS}")
    if len(hidden) == 0:
        raise ValueError("combine_layers needs at least one layer")
    shape = hidden[0].shape
    for h in hidden:
        if h.shape != shape:
            raise ValueError(f"all layers must have the same shape, got {tuple(shape)} and {tuple(h.shape)}")
    if norm == "per_layer":
        return torch.cat([_l2_normalise(h) for h in hidden], dim=-1)
    joined = torch.cat(list(hidden), dim=-1)
    return _l2_normalise(joined) if norm == "joint" else joined


def _gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens ``[..., T, E]``, index ``[...]`` long -> ``tokens[..., index, :]`` as ``[..., E]``."""
    idx = index[..., None, None].expand(*index.shape, 1, tokens.shape[-1])
    return tokens.gather(-2, idx).squeeze(-2)


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens [..., T, E]`` over positions where ``mask [..., T]``; zeros where none."""
    weights = mask.to(tokens.dtype)[..., None]
    count = mask.sum(-1, keepdim=True).clamp_min(1).to(tokens.dtype)
    return (tokens * weights).sum(-2) / count


def pool(
    tokens: torch.Tensor,
    valid: torch.Tensor,
    method: PoolMethod = "last_token",
    completion: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool per-token features into one embedding per sequence.

    tokens: ``[..., T, E]``; valid: ``[..., T]`` bool (real, non-padding tokens; one contiguous span
    per sequence); completion: ``[..., T]`` bool, required by ``completion_mean`` only.

    * ``last_token``: the token at the last valid position -> ``[..., E]``.
    * ``mean_pooling``: the mean over valid tokens -> ``[..., E]``.
    * ``completion_mean``: the mean over tokens that are valid and completion -> ``[..., E]``
      (zeros when a sequence has no such token).
    * ``concat``: the tokens at positions floor(q * n_valid), q = 1/4, 1/2, 3/4, counted from the first
      valid token, concatenated in that order -> ``[..., 3 * E]``.

    A sequence with no valid token pools to zeros for every method.
    """
    if method not in POOL_METHODS:
        raise ValueError(f"unknown embed_method {method!r}; expected one of {POOL_METHODS}")
    if tokens.ndim < 2 or valid.shape != tokens.shape[:-1]:
        raise ValueError(f"valid must have shape {tuple(tokens.shape[:-1])}, got {tuple(valid.shape)}")
    valid = valid.bool()

    if method == "mean_pooling":
        return _masked_mean(tokens, valid)
    if method == "completion_mean":
        if completion is None:
            raise ValueError("embed_method 'completion_mean' needs a completion mask")
        if completion.shape != valid.shape:
            raise ValueError(f"completion must have shape {tuple(valid.shape)}, got {tuple(completion.shape)}")
        return _masked_mean(tokens, valid & completion.bool())

    positions = torch.arange(tokens.shape[-2], device=tokens.device)
    n_valid = valid.sum(-1)  # [...]
    has_any = (n_valid > 0).to(tokens.dtype)[..., None]  # [..., 1]
    last = torch.where(valid, positions, 0).amax(-1)  # [...]
    if method == "last_token":
        return _gather_tokens(tokens, last) * has_any

    # concat: positions are offsets from the first valid token, so the span must be contiguous.
    first = torch.where(valid, positions, tokens.shape[-2]).amin(-1)
    if bool(((last - first + 1 != n_valid) & (n_valid > 0)).any()):
        raise ValueError("embed_method 'concat' needs one contiguous valid span per sequence")
    first = torch.where(n_valid > 0, first, 0)
    # floor(k * n / 4) <= n - 1 for k <= 3 and n >= 1, so every index stays inside the span.
    picked = [_gather_tokens(tokens, first + (k * n_valid) // 4) for k in _CONCAT_QUARTERS]
    return torch.cat(picked, dim=-1) * has_any

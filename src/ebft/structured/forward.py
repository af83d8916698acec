"""The policy's hidden states at the positions that predict loss tokens, padded or packed.

Padded: the views are right-padded to the longest one, [V, W] tokens go through the body. Packed
(``ebft.attention.packed``): the views share one row in which each common prefix (a prompt read by its n samples)
is stored once and every view attends to its own path only, so neither padding nor a repeated prompt
costs anything. Both return the same rows in the same order;
packing is used whenever the model's attention is one the packed backend reproduces exactly.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ebft.attention import packed as packing
from ebft.modeling.parts import backbone_of
from ebft.modeling.precision import autocast
from ebft.structured.rollout import right_padded


def use_packed(model: torch.nn.Module) -> bool:
    """True when ``model``'s attention can run packed with the same result (see ``packed.unsupported_reason``)."""
    return packing.unsupported_reason(model.config) is None


def training_backend(model: torch.nn.Module):
    """Keep the packed backend selected through a forward *and* its backward (gradient checkpointing
    recomputes layers there); a no-op for models that run padded."""
    return packing.packed_backend(model) if use_packed(model) else nullcontext()


def predicting_states(
    model: torch.nn.Module,
    views: list[tuple[list[int], list[bool]]],
    pad_id: int,
    *,
    autocast_dtype: torch.dtype | None = None,
    packed: bool | None = None,
    share_prefixes: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every loss token of ``views`` (token lists with per-token loss flags), view by view, in order:
    the hidden state of the token before it [T, H], its id [T] and its view index [T].

    A view's first token has nothing to predict it and is never a target. ``packed``: None picks by
    ``use_packed``; True/False force a path (the two compute the same values; tests compare them).
    ``share_prefixes`` (packed only): views that begin alike (a prompt's samples, a conversation's turns)
    compute their common prefix once; False packs each view whole (same values, more tokens).
    """
    device = next(model.parameters()).device
    packed = use_packed(model) if packed is None else packed
    amp = autocast(device, autocast_dtype)
    if packed:
        batch = packing.pack([seq for seq, _ in views], share_prefixes=share_prefixes)
        # A target's predicting state is the packed position of the token before it *in its own view*: for a
        # view's first token after a shared prefix that is the prefix's last position, not the row's previous.
        sources, targets, owner = [], [], []
        for v, (_, loss) in enumerate(views):
            at = batch.plan.index[v]
            for c in range(1, len(loss)):
                if loss[c]:
                    sources.append(at[c - 1])
                    targets.append(at[c])
                    owner.append(v)
        with amp:
            hidden = packing.packed_forward(backbone_of(model), batch)[0]  # [T_packed, H]
        ids = batch.ids[0].to(device)
        src = torch.tensor(sources, dtype=torch.long, device=device)
        dst = torch.tensor(targets, dtype=torch.long, device=device)
        return hidden[src], ids[dst], torch.tensor(owner, dtype=torch.long, device=device)
    ids, _ = right_padded([seq for seq, _ in views], pad_id)
    width = ids.shape[1]
    mask = torch.zeros(len(views), width, dtype=torch.bool)
    for v, (_, loss) in enumerate(views):
        mask[v, : len(loss)] = torch.tensor(loss, dtype=torch.bool)
    mask[:, 0] = False  # nothing predicts the first token
    ids, mask = ids.to(device), mask.to(device)
    with amp:
        positions = torch.arange(width, device=device).expand_as(ids)
        hidden = backbone_of(model)(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: view by view, tokens in order
    return hidden[rows, cols - 1], ids[rows, cols], rows

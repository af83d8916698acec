"""Scoring a rollout batch: whole sequences through the frozen feature network, feature-matching rewards
and group advantages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ebft import features as feat
from ebft import rewards
from ebft.attention import packed as packing
from ebft.data.structured import PromptRow
from ebft.modeling.feature_network import FeatureNetwork
from ebft.structured.forward import use_packed
from ebft.structured.rollout import Sample, right_padded
from ebft.structured.settings import StructuredSettings

# Sequences per feature-network forward when scoring a rollout batch.
FEATURE_BATCH = 16


@dataclass
class Scores:
    """Reward terms of P groups of G completions (float32).

    alignment, diversity, reward, advantage: ``[P, G]``; cfm: ``[P]``.
    """

    alignment: torch.Tensor
    diversity: torch.Tensor
    reward: torch.Tensor
    advantage: torch.Tensor
    cfm: torch.Tensor


def embed(
    features: FeatureNetwork,
    seqs: list[list[int]],
    prompt_lengths: list[int],
    s: StructuredSettings,
    pad_id: int,
    batch_size: int,
    *,
    packed: bool | None = None,
    share_prefixes: bool = True,
) -> torch.Tensor:
    """Pooled features of whole sequences: N token lists -> [N, E] (float32, on the features' device).

    ``packed``: each chunk runs as one padding-free row (``ebft.attention.packed``); None: whenever that is exact.
    ``share_prefixes``: in that row each common prefix (a prompt's samples) is computed once.
    """
    out = []
    packed = use_packed(features.body) if packed is None else packed
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids, lengths = right_padded(chunk, pad_id)
        if packed:  # one padding-free row; the pooled tokens are laid out padded again (cheap, [B, S, E])
            row = packing.pack(chunk, share_prefixes=share_prefixes)
            tokens = packing.unpack(
                feat.combine_layers(features(row.ids, row.positions, row.plan), s.feature_norm), row.plan
            )
        else:
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            tokens = feat.combine_layers(features(ids, positions), s.feature_norm)  # [B, S, E]
        col = torch.arange(ids.shape[1], device=tokens.device)
        valid = col < lengths.to(tokens.device)[:, None]
        prompt = torch.tensor(prompt_lengths[start : start + batch_size], device=tokens.device)
        out.append(feat.pool(tokens, valid, s.embed_method, col >= prompt[:, None]))
    return torch.cat(out)


def embed_pairs(
    features: FeatureNetwork,
    rows: list[PromptRow],
    samples: list[Sample],
    s: StructuredSettings,
    pad_id: int,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of both sides, whole sequences through the frozen network: prompt + completion
    (or the rolled-out conversation) -> gen ``[P, G, E]``, prompt + ground truth (the ground-truth
    conversation) -> gt ``[P, E]``. ``samples`` in ``roll_out`` order."""
    gen = embed(
        features,
        [q.sequence[: q.feature_length] for q in samples],
        [q.prompt_length for q in samples],
        s,
        pad_id,
        batch_size,
    )
    gt = embed(
        features,
        [list(r.prompt_ids) + list(r.gt_ids) for r in rows],
        [len(r.prompt_ids) for r in rows],
        s,
        pad_id,
        batch_size,
    )
    return gen.reshape(len(rows), s.num_generations, -1), gt


def duplicate_samples(samples: list[Sample], num_prompts: int, num_generations: int) -> torch.Tensor:
    """``rewards.duplicate_sources`` of P groups of G samples (``roll_out`` order), ``[P, G]``: copies are
    found by the tokens the feature network reads."""
    ids, _ = right_padded([q.sequence[: q.feature_length] for q in samples], -1)  # -1: no token id
    return rewards.duplicate_sources(ids.reshape(num_prompts, num_generations, -1))


def score(
    features: FeatureNetwork,
    rows: list[PromptRow],
    samples: list[Sample],
    s: StructuredSettings,
    pad_id: int,
    *,
    batch_size: int,
    batch_std: Callable[[torch.Tensor], float] | None = None,
) -> Scores:
    """Feature-matching rewards (paper eq. 7) and group advantages of every completion.

    Both sides are embedded by ``embed_pairs``. ``batch_std`` maps this
    process's rewards to the standard deviation over the whole rollout batch (all processes); it is
    needed for ``scale_rewards: batch`` only.
    """
    gen, gt = embed_pairs(features, rows, samples, s, pad_id, batch_size)
    same_as = duplicate_samples(samples, len(rows), s.num_generations).to(gen.device)
    terms = rewards.reward_terms_for(gen, gt, s, same_as=same_as)
    spread = None
    if s.scale_rewards == "batch":
        if batch_std is None:
            raise ValueError("scale_rewards: batch needs batch_std, the standard deviation over the rollout batch")
        spread = batch_std(terms.reward)
    adv = rewards.group_advantages(terms.reward, s.scale_rewards, spread)
    return Scores(terms.alignment, terms.diversity, terms.reward, adv, terms.cfm)

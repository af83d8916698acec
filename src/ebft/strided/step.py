"""One strided EBFT micro-batch: rollouts -> features -> rewards -> loss (docs/design.md §4-5).

The caller (the trainer) owns the optimizer. It passes the token counts of the whole optimizer step
(``StepTotals``) so every micro-batch's loss is already divided by the step's totals; summing the
micro-batch gradients then gives the same update for any split of the step (1 x 8 == 8 x 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ebft import features as feat
from ebft import rewards
from ebft.attention.strided import StridedPlan, build_plan, strided_backend, strided_forward
from ebft.attention.strided_layout import StridedLayout, build_layout
from ebft.choices import AdvantageEstimator, FeatureNorm, PoolMethod, WhiteningSpace, single_sample_fallback
from ebft.data.collate import DocumentBatch
from ebft.losses import token_logprobs
from ebft.modeling.feature_network import FeatureNetwork
from ebft.modeling.parts import backbone_of, output_head
from ebft.modeling.precision import autocast
from ebft.strided.generate import generate_blocks, pack
from ebft.strided.stats import StridedStats
from ebft.train.allocator import large_blocks_from_mmap
from ebft.train.distributed import Sharding


@dataclass
class StridedSettings:
    """The ``ebft:`` keys the strided step reads (see ``ebft.config.EbftSection``)."""

    stride: int
    context_length: int
    generate_max_len: int
    n_samples_per_prompt: int
    temperature: float
    top_p: float
    min_completion_prefix: int
    embed_method: PoolMethod
    feature_norm: FeatureNorm
    use_whitening: bool
    whitening_space: WhiteningSpace
    alignment_coef: float
    diversity_coef: float
    advantage_estimator: AdvantageEstimator
    rl_coef: float
    ce_coef: float

    @classmethod
    def from_config(cls, ebft_cfg) -> StridedSettings:
        n = ebft_cfg.n_samples_per_prompt
        # With one sample there is no group: no diversity term and no baseline (the config warns).
        estimator, diversity_coef = single_sample_fallback(n, ebft_cfg.advantage_estimator, ebft_cfg.diversity_coef)
        return cls(
            stride=ebft_cfg.stride,
            context_length=ebft_cfg.context_length,
            generate_max_len=ebft_cfg.generate_max_len,
            n_samples_per_prompt=n,
            temperature=ebft_cfg.temperature,
            top_p=ebft_cfg.top_p,
            min_completion_prefix=ebft_cfg.min_completion_prefix,
            embed_method=ebft_cfg.embed_method,
            feature_norm=ebft_cfg.feature_norm,
            use_whitening=ebft_cfg.use_whitening,
            whitening_space=ebft_cfg.whitening_space,
            alignment_coef=ebft_cfg.alignment_coef,
            diversity_coef=diversity_coef,
            advantage_estimator=estimator,
            rl_coef=ebft_cfg.rl_coef,
            ce_coef=ebft_cfg.ce_coef,
        )

    @property
    def logprob_temperature(self) -> float:
        # Greedy decoding (T = 0) has no tempered density; the untempered policy is scored instead.
        return self.temperature if self.temperature > 0 else 1.0


@dataclass(frozen=True)
class StepTotals:
    """Token counts over a whole optimizer step (all micro-batches, all processes)."""

    rl_tokens: int
    ce_tokens: int


def layout_for(batch: DocumentBatch, s: StridedSettings) -> StridedLayout:
    return build_layout(
        batch.lengths,
        batch.prompt_length,
        batch.input_ids.shape[1],
        stride=s.stride,
        context_length=s.context_length,
        gen_len=s.generate_max_len,
        min_completion_prefix=s.min_completion_prefix,
        n=s.n_samples_per_prompt,
    )


def count_targets(batch: DocumentBatch, s: StridedSettings) -> StepTotals:
    """Loss targets of a micro-batch, known before any forward: generated tokens and CE labels."""
    layout = layout_for(batch, s)
    rl = int(layout.valid.sum()) * s.n_samples_per_prompt * s.generate_max_len
    ce = int((batch.labels[:, 1:] != -100).sum()) if s.ce_coef > 0 else 0
    return StepTotals(rl_tokens=rl, ce_tokens=ce)


@dataclass
class Scores:
    """Per-block reward terms scattered back to [D, n, K]; zero on invalid slots."""

    alignment: torch.Tensor
    diversity: torch.Tensor
    reward: torch.Tensor
    advantage: torch.Tensor
    cfm: torch.Tensor  # [D, K]


@dataclass
class MicroBatchResult:
    """A micro-batch's statistics (``stats.loss``: its share of the step loss, whose gradient is already
    accumulated) and, when asked for, its rollout records."""

    stats: StridedStats
    rollouts: list[dict] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.stats.loss


# What ``score_rollouts`` runs the features with: a ``FeatureNetwork``, or its output of this batch reused.
EmbedRows = Callable[[torch.Tensor, torch.Tensor, StridedPlan], list[torch.Tensor]]


def score_rollouts(
    features: EmbedRows,
    packed: torch.Tensor,
    plan: StridedPlan,
    position_ids: torch.Tensor,
    layout: StridedLayout,
    labels: torch.Tensor,
    s: StridedSettings,
) -> Scores:
    """Feature pass, pooling, whitening, rewards and advantages for every (document, block)."""
    hidden = features(packed, position_ids, plan)  # per layer [D, S, H]
    D, n, K, g = layout.num_docs, layout.n, layout.k, layout.g
    gt_idx = layout.gt_index().to(packed.device)  # [D, K, g]
    gen_idx = layout.gen_index().to(packed.device)  # [n, K, g]
    gt_layers, gen_layers = [], []
    for h in hidden:
        h = h.to(packed.device)
        H = h.shape[-1]
        gt_layers.append(h.gather(1, gt_idx.reshape(D, -1, 1).expand(-1, -1, H)).reshape(D, K, g, H))
        gen_layers.append(h[:, gen_idx.reshape(-1)].reshape(D, n, K, g, H))
    gt_tok = feat.combine_layers(gt_layers, s.feature_norm)  # [D, K, g, E]
    gen_tok = feat.combine_layers(gen_layers, s.feature_norm)  # [D, n, K, g, E]
    all_tokens = torch.ones(D, K, g, dtype=torch.bool, device=packed.device)
    # A generated token counts as "completion" when the ground-truth token it stands in for is labelled.
    completion = labels.gather(1, gt_idx.reshape(D, -1)).reshape(D, K, g) != -100
    gt_vec = feat.pool(gt_tok, all_tokens, s.embed_method, completion)  # [D, K, E']
    gen_vec = feat.pool(
        gen_tok,
        all_tokens[:, None].expand(-1, n, -1, -1),
        s.embed_method,
        completion[:, None].expand(-1, n, -1, -1),
    )  # [D, n, K, E']

    valid = layout.valid.to(packed.device)  # [D, K]
    groups_gen = gen_vec.permute(0, 2, 1, 3)[valid]  # [G, n, E']
    groups_gt = gt_vec[valid]  # [G, E']
    # A group is the n samples of one (document, block); copies are found by their generated tokens.
    block_ids = packed[:, gen_idx.reshape(-1)].reshape(D, n, K, g).permute(0, 2, 1, 3)[valid]  # [G, n, g]
    terms = rewards.reward_terms_for(groups_gen, groups_gt, s, same_as=rewards.duplicate_sources(block_ids))
    adv = rewards.advantages(terms, s.advantage_estimator, s.alignment_coef, s.diversity_coef)

    def scatter(values: torch.Tensor) -> torch.Tensor:  # [G, n] -> [D, n, K]
        out = values.new_zeros(D, K, n)
        out[valid] = values
        return out.permute(0, 2, 1)

    cfm = terms.cfm.new_zeros(D, K)
    cfm[valid] = terms.cfm
    return Scores(
        alignment=scatter(terms.alignment),
        diversity=scatter(terms.diversity),
        reward=scatter(terms.reward),
        advantage=scatter(adv),
        cfm=cfm,
    )


@dataclass
class Rollouts:
    """A micro-batch's sampled blocks and the packed rows built from them."""

    layout: StridedLayout
    positions: torch.Tensor  # [D, S] position ids of the packed rows
    tokens: torch.Tensor  # [D, n, K, g] sampled tokens
    packed: torch.Tensor  # [D, S] documents followed by their step-major rollouts
    plan: StridedPlan  # sparse attention for the packed rows


def roll_out(
    policy: torch.nn.Module,
    batch: DocumentBatch,
    s: StridedSettings,
    *,
    generators: list[torch.Generator] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Rollouts:
    """Sample every block of every document (KV-cached) and pack the rows for the later passes."""
    layout = layout_for(batch, s)
    positions = layout.position_ids()
    tokens = generate_blocks(
        policy,
        batch.input_ids,
        layout,
        temperature=s.temperature,
        top_p=s.top_p,
        position_ids=positions,
        autocast_dtype=autocast_dtype,
        generators=generators,
    )
    plan = build_plan(layout, use_flex=batch.input_ids.device.type == "cuda")
    return Rollouts(layout, positions, tokens, pack(batch.input_ids, tokens), plan)


def strided_microbatch(
    policy: torch.nn.Module,
    features: FeatureNetwork,
    batch: DocumentBatch,
    s: StridedSettings,
    totals: StepTotals,
    *,
    autocast_dtype: torch.dtype | None = None,
    generators: list[torch.Generator] | None = None,
    keep_rollouts: bool = False,
    sharding: Sharding | None = None,
) -> MicroBatchResult:
    """Run one micro-batch, back-propagate its loss (divided by the optimizer step's totals) into the
    policy's ``.grad``, and return its statistics (the loss value among them).

    ``generators``: one per document (see ``generate_blocks``); the trainer derives them from the seed,
    the step and the document's place in the step, so rollouts are reproducible and independent of
    how the step is split into micro-batches. ``sharding``: how the policy runs under FSDP
    (``ebft.train.distributed``); default unsharded.
    """
    device = batch.input_ids.device
    sharding = sharding or Sharding(policy)
    with sharding.gathered():
        r = roll_out(policy, batch, s, generators=generators, autocast_dtype=autocast_dtype)
        scores = score_rollouts(features, r.packed, r.plan, r.positions, r.layout, batch.labels, s)
    layout, tokens = r.layout, r.tokens
    use_flex = r.plan.uses_flex

    D, n, K, g = layout.num_docs, layout.n, layout.k, layout.g
    logp = torch.zeros(D, n, K, g, device=device)
    rl_sum = ce_sum = 0.0
    # The policy pass runs one packed row at a time and back-propagates at once, so only one
    # document's activations are alive; the loss is a sum over documents, so the gradient is unchanged.
    for d in range(D):
        rl_d, ce_d, logp[d] = _policy_document(
            sharding, batch, d, layout, tokens, scores.advantage, s, totals, autocast_dtype, use_flex
        )
        rl_sum += rl_d
        ce_sum += ce_d
    loss = s.rl_coef * rl_sum / max(totals.rl_tokens, 1)
    if s.ce_coef > 0:
        loss += s.ce_coef * ce_sum / max(totals.ce_tokens, 1)

    sample_valid = layout.valid[:, None, :].expand(D, n, K)
    adv = scores.advantage[sample_valid]
    stats = StridedStats(
        blocks=float(layout.valid.sum()),
        docs=float(D),
        samples=float(sample_valid.sum()),
        alignment=float(scores.alignment[sample_valid].sum()),
        diversity=float(scores.diversity[sample_valid].sum()),
        reward=float(scores.reward[sample_valid].sum()),
        advantage=float(adv.sum()),
        advantage_sq=float((adv.double() ** 2).sum()),
        cfm=float(scores.cfm[layout.valid].sum()),
        rl_sum=rl_sum,
        rl_tokens=float(sample_valid.sum() * g),
        ce_sum=ce_sum,
        ce_tokens=float((batch.labels[:, 1:] != -100).sum()) if s.ce_coef > 0 else 0.0,
        doc_tokens=float(batch.lengths.sum()),
        loss=loss,
    )
    records = rollout_records(batch, layout, tokens, logp, scores) if keep_rollouts else []
    return MicroBatchResult(stats=stats, rollouts=records)


def _policy_document(
    sharding: Sharding,
    batch: DocumentBatch,
    d: int,
    layout: StridedLayout,
    tokens,
    advantage,
    s,
    totals,
    autocast_dtype,
    use_flex,
) -> tuple[float, float, torch.Tensor]:
    """Forward document d's packed row with grad and back-propagate its share of the step loss.

    Returns (RL sum, CE sum, log-probs [n, K, g] used in the loss, zero on invalid slots).
    """
    device = batch.input_ids.device
    lay = layout.select(d)
    n, K, g = lay.n, lay.k, lay.g
    tok_valid = lay.valid[0][None, :, None].expand(n, K, g)
    doc_ids = batch.input_ids[d]
    amp = autocast(device, autocast_dtype)
    packed = pack(doc_ids[None], tokens[d : d + 1])
    plan = build_plan(lay, use_flex=use_flex)
    # Teacher-forced CE on the document's labelled tokens, counted once (the row is shared by all samples).
    ce_mask = batch.labels[d, 1:] != -100  # target x_{p+1} is predicted at position p

    def forward(policy):
        head = output_head(policy)
        with amp:
            hidden = strided_forward(backbone_of(policy), packed, lay.position_ids(), plan)[0]  # [S, H]
            # RL: generated token (t, i, k) is scored by its own rollout's previous position (predictor_index).
            logp = token_logprobs(
                hidden[lay.predictor_index()[0][tok_valid]],
                tokens[d][tok_valid],
                head,
                temperature=s.logprob_temperature,
                top_p=s.top_p,
            )
            if s.ce_coef == 0:
                return logp, None
            return logp, token_logprobs(hidden[: doc_ids.shape[0] - 1][ce_mask], doc_ids[1:][ce_mask], head)

    # The backend stays selected through backward: gradient checkpointing recomputes the layers there.
    with strided_backend(sharding.model):
        with large_blocks_from_mmap():  # see ebft.train.allocator: what the forward keeps must not pin freed memory
            logp, ce_logp = sharding.grad_pass(forward)
        rl_sum = -(advantage[d, :, :, None].expand(n, K, g)[tok_valid].detach() * logp).sum()
        loss = s.rl_coef * rl_sum / max(totals.rl_tokens, 1)
        ce_sum = torch.zeros((), device=device)
        if ce_logp is not None:
            ce_sum = -ce_logp.sum()
            loss = loss + s.ce_coef * ce_sum / max(totals.ce_tokens, 1)
        if loss.requires_grad:
            loss.backward()
    full = torch.zeros(tokens.shape[1:], device=device)
    full[tok_valid] = logp.detach().float()
    return float(rl_sum.detach()), float(ce_sum.detach()), full


def document_generators(seed: int, step: int, first_doc: int, count: int, device) -> list[torch.Generator]:
    """One generator per document, keyed by (seed, step, position of the document in the step)."""
    gens = []
    for j in range(first_doc, first_doc + count):
        gen = torch.Generator(device=device)
        gen.manual_seed(hash((seed, step, j)) & (2**63 - 1))
        gens.append(gen)
    return gens


def rollout_records(
    batch: DocumentBatch,
    layout: StridedLayout,
    tokens: torch.Tensor,
    logp: torch.Tensor,
    scores: Scores,
) -> list[dict]:
    """One JSON-ready dict per document: exactly the tokens, log-probs and rewards the loss used."""
    D, n, K, g = tokens.shape
    logp_full = logp.float().cpu()  # [D, n, K, g], zero on invalid slots
    out = []
    for d in range(D):
        blocks = int(layout.valid[d].sum())
        samples = []
        for i in range(n):
            samples.append(
                [
                    {
                        "tokens": tokens[d, i, k].tolist(),
                        "logprobs": logp_full[d, i, k].tolist(),
                        "alignment": float(scores.alignment[d, i, k]),
                        "diversity": float(scores.diversity[d, i, k]),
                        "reward": float(scores.reward[d, i, k]),
                        "advantage": float(scores.advantage[d, i, k]),
                    }
                    for k in range(blocks)
                ]
            )
        out.append(
            {
                "input_ids": batch.input_ids[d].tolist(),
                "length": int(batch.lengths[d]),
                "anchors": layout.anchors[d, :blocks].tolist(),
                "samples": samples,
            }
        )
    return out

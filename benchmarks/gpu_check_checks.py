"""The equality checks of ``gpu_check.py``: does the strided packed row compute what the model computes?

Two oracles, both built from the model's own plain forward (its configured attention, causal, no plan):

* ``packed_row_checks``: every generated token of the packed row (document + n*K blocks of g tokens),
  run through ebft's attention plan, against a plain forward of ``x[:c_k] + its block`` alone; compared
  are the LM-head logits, the log-probs ebft gathers through ``predictor_index`` and the feature
  network's hidden states at the feature layers. Paths: the chunked SDPA plan (CPU and fallback), the
  flex BlockMask run eagerly, and (CUDA only) the compiled flex kernel that training uses.
* ``cached_decoding_check`` (fp32): KV-cached block-parallel greedy decoding (``generate_blocks``, SDPA
  with the strided mask over the cache) against greedy decoding of every block by full recomputation of
  its own prefix; every token must agree (bf16 rounding would flip near-tied argmaxes, so fp32 only).
* ``gradient_checks``: one real ``strided_microbatch`` (rollouts, features, rewards, policy pass and
  backward, on the device's training path) against the same loss recomputed over the dense S x S mask
  with the model's SDPA; compared are the loss, the log-probs and every parameter's gradient.

Errors: ``max|got - want| / max|want|`` for logits and features, ``||got - want|| / ||want||`` for the
gradient, ``|got - want| / |want|`` for the loss, ``max|got - want|`` in nats for log-probs, and the
fraction of blocks with any differing token for decoding. A wrong
mask, position or predictor row gives errors of order 1; the tolerances below leave room only for
floating-point reassociation (fp32) and bf16 rounding compounded over the layers (8-bit mantissa,
2^-8 = 0.4% per operation).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

TOLERANCE = {
    "fp32": {"logits": 1e-3, "features": 1e-3, "logprobs": 1e-3, "loss": 1e-4, "gradient": 1e-3, "tokens": 0.0},
    "bf16": {"logits": 5e-2, "features": 5e-2, "logprobs": 0.1, "loss": 1e-2, "gradient": 0.1},
}
AMP = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class Check:
    """One comparison: ``error`` (see the module docstring) against ``tolerance``."""

    quantity: str
    precision: str
    path: str
    error: float
    tolerance: float
    passed: bool


def error_of(quantity: str, got: torch.Tensor, want: torch.Tensor) -> float:
    """The module docstring's error measure for ``quantity``; NaN or Inf anywhere counts as infinite."""
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        raise ValueError(f"{quantity}: shapes differ, {tuple(got.shape)} vs {tuple(want.shape)}")
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return float("inf")
    diff = got - want
    if quantity == "logprobs":
        return float(diff.abs().max())
    if quantity in ("gradient", "loss"):
        return float(diff.norm() / want.norm().clamp_min(1e-30))
    return float(diff.abs().max() / want.abs().max().clamp_min(1e-30))


def compare(quantity: str, precision: str, path: str, got: torch.Tensor, want: torch.Tensor) -> Check:
    err, tol = error_of(quantity, got, want), TOLERANCE[precision][quantity]
    return Check(quantity, precision, path, err, tol, err <= tol)


def _autocast(device: torch.device, precision: str):
    amp = AMP[precision]
    return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()


def check_documents(vocab: int, lengths: list[int], device: torch.device, seed: int = 1):
    """A DocumentBatch of random documents of the given lengths (right padded, fully labelled)."""
    from ebft.data.collate import collate_documents

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return collate_documents(rows, pad_token_id=0).to(device)


def _block_rows(batch, layout, tokens: torch.Tensor):
    """Every valid (document, sample, block) as its own sequence ``x[:c_k] + block``, right padded.

    Returns ids [R, W], the packed rows of its g tokens [R, g] and their positions in the own
    sequence [R, g], and the document of each row [R].
    """
    triples = [
        (d, i, k) for d in range(layout.num_docs) for k in range(int(layout.valid[d].sum())) for i in range(layout.n)
    ]
    device, g = tokens.device, layout.g
    row_doc, row_sample, row_block = (torch.tensor(v, device=device) for v in zip(*triples, strict=True))
    anchors = layout.anchors.to(device)[row_doc, row_block]  # [R]
    ids = torch.zeros(len(triples), int(anchors.max()) + g, dtype=torch.long, device=device)
    for r, (d, i, k) in enumerate(triples):
        c = int(anchors[r])
        ids[r, :c] = batch.input_ids[d, :c]
        ids[r, c : c + g] = tokens[d, i, k]
    steps = torch.arange(g, device=device)
    packed_rows = layout.gen_index().to(device)[row_sample, row_block]  # [R, g]
    own_rows = anchors[:, None] + steps  # [R, g]
    return ids, packed_rows, own_rows, row_doc


def _pick(hidden: torch.Tensor, batch_rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H], batch_rows [R], positions [R, g] -> [R, g, H]."""
    return hidden[batch_rows[:, None], positions]


def packed_row_checks(model, batch, settings, precision: str, paths: dict[str, dict]) -> list[Check]:
    """Logits, log-probs and feature-layer states of the packed row under each plan in ``paths``
    (name -> ``build_plan`` keywords) against plain forwards of every block on its own prefix."""
    from ebft.attention.strided import build_plan, strided_backend, strided_forward
    from ebft.features import layer_indices
    from ebft.losses import token_logprobs
    from ebft.modeling.feature_network import FeatureNetwork
    from ebft.modeling.parts import backbone_of
    from ebft.strided.generate import pack
    from ebft.strided.step import layout_for

    device = batch.input_ids.device
    layout = layout_for(batch, settings)
    gen = torch.Generator(device=device).manual_seed(7)
    vocab = model.config.vocab_size
    tokens = torch.randint(3, vocab, (layout.num_docs, layout.n, layout.k, layout.g), generator=gen, device=device)
    packed, positions = pack(batch.input_ids, tokens), layout.position_ids().to(device)
    ids, packed_rows, own_rows, row_doc = _block_rows(batch, layout, tokens)
    own_positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    valid = layout.valid.to(device)[:, None, :, None].expand_as(tokens)
    block_tokens = tokens.permute(0, 2, 1, 3)[valid.permute(0, 2, 1, 3)].reshape(-1, layout.g)  # [R, g], (d, k, i)
    body, head = backbone_of(model), model.get_output_embeddings()
    layers = layer_indices([0.25, 0.5, 0.75], model.config.num_hidden_layers)
    features = FeatureNetwork(model, layers, autocast_dtype=AMP[precision])
    temperature = settings.logprob_temperature
    amp = _autocast(device, precision)
    with torch.no_grad():
        with amp:
            own_hidden = body(input_ids=ids, position_ids=own_positions, use_cache=False).last_hidden_state
            want_logits = head(_pick(own_hidden, torch.arange(len(ids), device=device), own_rows)).float()
            # Step t is predicted by the row before it in its own sequence: c_k - 1 + t.
            prev = head(_pick(own_hidden, torch.arange(len(ids), device=device), own_rows - 1)).float()
        want_logp = (prev / temperature).log_softmax(-1).gather(-1, block_tokens[..., None]).squeeze(-1)
        own_feats = features(ids, own_positions)
        want_feats = torch.stack([_pick(h, torch.arange(len(ids), device=device), own_rows) for h in own_feats])
        predictors = layout.predictor_index().to(device)  # [D, n, K, g]
        pred_rows = predictors.permute(0, 2, 1, 3)[valid.permute(0, 2, 1, 3)].reshape(-1, layout.g)
        out = []
        for path, plan_kwargs in paths.items():
            plan = build_plan(layout, **plan_kwargs)
            with amp, strided_backend(model):
                hidden = strided_forward(body, packed, positions, plan)
                got_logits = head(_pick(hidden, row_doc, packed_rows)).float()
                got_logp = token_logprobs(
                    _pick(hidden, row_doc, pred_rows).reshape(-1, hidden.shape[-1]),
                    block_tokens.reshape(-1),
                    head,
                    temperature=temperature,
                ).reshape(block_tokens.shape)
            got_feats = torch.stack([_pick(h, row_doc, packed_rows) for h in features(packed, positions, plan)])
            out.append(compare("logits", precision, path, got_logits, want_logits))
            out.append(compare("logprobs", precision, path, got_logp, want_logp))
            out.append(compare("features", precision, path, got_feats, want_feats))
    return out


def cached_decoding_check(model, batch, settings) -> Check:
    """Greedy ``generate_blocks`` (fp32) against greedy full recomputation of each block from ``x[:c_k]``."""
    from ebft.modeling.parts import backbone_of
    from ebft.strided.generate import generate_blocks
    from ebft.strided.step import layout_for

    layout = layout_for(batch, settings)
    device, g = batch.input_ids.device, layout.g
    with torch.no_grad():
        got = generate_blocks(model, batch.input_ids, layout, temperature=0.0)  # [D, n, K, g]
        pairs = [(d, k) for d in range(layout.num_docs) for k in range(int(layout.valid[d].sum()))]
        anchors = torch.tensor([int(layout.anchors[d, k]) for d, k in pairs], device=device)  # [R]
        seqs = torch.zeros(len(pairs), int(anchors.max()) + g, dtype=torch.long, device=device)
        for r, (d, _k) in enumerate(pairs):
            seqs[r, : anchors[r]] = batch.input_ids[d, : anchors[r]]
        body, head, rows = backbone_of(model), model.get_output_embeddings(), torch.arange(len(pairs), device=device)
        for t in range(g):  # right padding is causal-safe: a row never attends to the padding after it
            hidden = body(input_ids=seqs[:, : int(anchors.max()) + t], use_cache=False).last_hidden_state
            seqs[rows, anchors + t] = head(hidden[rows, anchors + t - 1]).argmax(-1)
        want = seqs[rows[:, None], anchors[:, None] + torch.arange(g, device=device)]  # [R, g]
    d_idx = torch.tensor([d for d, _ in pairs], device=device)
    k_idx = torch.tensor([k for _, k in pairs], device=device)
    mismatched = (got[d_idx, :, k_idx] != want[:, None, :]).any(-1)  # [R, n]
    err = float(mismatched.float().mean())
    return Check("tokens", "fp32", "cached decoding (sdpa)", err, TOLERANCE["fp32"]["tokens"], err <= 0.0)


def _flat_grads(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])


def gradient_checks(model, batch, settings, precision: str, path: str, perturb: float = 0.0) -> list[Check]:
    """One training micro-batch (``strided_microbatch``, the device's own attention path) against the
    same loss over the dense mask; ``perturb`` is added to the step's gradient first (self-test only)."""
    from ebft.features import layer_indices
    from ebft.modeling.feature_network import FeatureNetwork
    from ebft.modeling.parts import backbone_of
    from ebft.strided.generate import pack
    from ebft.strided.step import count_targets, document_generators, layout_for, strided_microbatch

    device = batch.input_ids.device
    s = settings
    params = [p for p in model.parameters() if p.requires_grad]
    features = FeatureNetwork(
        model,
        layer_indices([0.25, 0.5, 0.75], model.config.num_hidden_layers),
        device=device,
        autocast_dtype=AMP[precision],
    )
    totals = count_targets(batch, s)
    model.zero_grad(set_to_none=True)
    D = batch.input_ids.shape[0]
    result = strided_microbatch(
        model,
        features,
        batch,
        s,
        totals,
        autocast_dtype=AMP[precision],
        generators=document_generators(0, 1, 0, D, device),
        keep_rollouts=True,
    )
    step_grad = _flat_grads(params) + perturb
    model.zero_grad(set_to_none=True)

    layout = layout_for(batch, s)
    tokens = torch.zeros(D, layout.n, layout.k, layout.g, dtype=torch.long, device=device)
    advantage = torch.zeros(D, layout.n, layout.k, device=device)
    step_logp = torch.zeros(D, layout.n, layout.k, layout.g, device=device)
    for d, record in enumerate(result.rollouts):
        for i, blocks in enumerate(record["samples"]):
            for k, block in enumerate(blocks):
                tokens[d, i, k] = torch.tensor(block["tokens"], device=device)
                advantage[d, i, k] = block["advantage"]
                step_logp[d, i, k] = torch.tensor(block["logprobs"], device=device)
    valid = layout.valid.to(device)[:, None, :, None].expand_as(tokens)
    packed, positions = pack(batch.input_ids, tokens), layout.position_ids().to(device)
    head = model.get_output_embeddings()
    with _autocast(device, precision):
        hidden = backbone_of(model)(
            input_ids=packed, attention_mask=layout.attention_mask().to(device), position_ids=positions, use_cache=False
        ).last_hidden_state
        rows = layout.predictor_index().to(device)  # [D, n, K, g]
        pred = hidden[torch.arange(D, device=device)[:, None, None, None], rows][valid]  # [T, H]
        logits = head(pred).float() / s.logprob_temperature
        logp = logits.log_softmax(-1).gather(-1, tokens[valid][:, None]).squeeze(-1)
        loss = s.rl_coef * -(advantage[..., None].expand_as(tokens)[valid] * logp).sum() / max(totals.rl_tokens, 1)
        if s.ce_coef > 0:
            labels = batch.labels[:, 1:]
            ce_logits = head(hidden[:, : batch.input_ids.shape[1] - 1][labels != -100]).float()
            ce = -ce_logits.log_softmax(-1).gather(-1, labels[labels != -100][:, None]).sum()
            loss = loss + s.ce_coef * ce / max(totals.ce_tokens, 1)
    loss.backward()
    dense_grad = _flat_grads(params)
    model.zero_grad(set_to_none=True)
    return [
        compare("loss", precision, path, torch.tensor([result.loss]), loss.detach().double().cpu()[None]),
        compare("logprobs", precision, path, step_logp[valid], logp.detach()),
        compare("gradient", precision, path, step_grad, dense_grad),
    ]

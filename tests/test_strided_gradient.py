"""The strided step's settings, per-document generators, and gradient against independent computations: the
exact expected-reward gradient, accumulation and padding invariance, the CE term, token weighting, and the
micro-batch sums the rollout records show.
"""

from __future__ import annotations

import dataclasses
import itertools
from types import SimpleNamespace

import pytest
import torch
from strided_builders import V, document_row, random_model, strided_settings, teacher_forced_logp

from ebft import features as feat
from ebft.data.collate import collate_documents
from ebft.modeling.feature_network import FeatureNetwork
from ebft.strided.step import StepTotals, StridedSettings, count_targets, document_generators, strided_microbatch


def test_settings_from_config_copy_every_key_and_drop_group_terms_for_one_sample():
    # Every key a distinct non-default value, so a key read from the wrong field shows.
    keys = {
        "stride": 3,
        "context_length": 5,
        "generate_max_len": 7,
        "n_samples_per_prompt": 4,
        "temperature": 0.7,
        "top_p": 0.9,
        "min_completion_prefix": 2,
        "embed_method": "concat",
        "feature_norm": "joint",
        "use_whitening": True,
        "whitening_space": "sample",
        "alignment_coef": 1.5,
        "diversity_coef": 0.25,
        "advantage_estimator": "group_norm",
        "rl_coef": 0.8,
        "ce_coef": 0.1,
    }
    assert dataclasses.asdict(StridedSettings.from_config(SimpleNamespace(**keys))) == keys
    # One sample: no group, so no diversity term and no baseline (REINFORCE); two samples are a group.
    one = StridedSettings.from_config(SimpleNamespace(**{**keys, "n_samples_per_prompt": 1}))
    expected = {**keys, "n_samples_per_prompt": 1, "diversity_coef": 0.0, "advantage_estimator": "reinforce"}
    assert dataclasses.asdict(one) == expected
    two = StridedSettings.from_config(SimpleNamespace(**{**keys, "n_samples_per_prompt": 2}))
    assert dataclasses.asdict(two) == {**keys, "n_samples_per_prompt": 2}


def test_document_generators_are_keyed_by_seed_step_and_position():
    def draws(seed, step, first, count):
        return [
            torch.randint(0, 2**31, (4,), generator=g).tolist()
            for g in document_generators(seed, step, first, count, "cpu")
        ]

    base = draws(0, 1, 0, 4)
    assert base == draws(0, 1, 0, 4)  # reproducible
    assert draws(0, 1, 2, 2) == base[2:]  # a document's stream depends on its place in the step, not on the split
    gens = [document_generators(seed, step, j, 1, "cpu")[0] for seed in range(4) for step in range(4) for j in range(4)]
    assert len({g.initial_seed() for g in gens}) == 64  # every (seed, step, position) its own stream
    assert all(g.device == torch.device("cpu") for g in gens)


def _grads(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _accumulated(params):
    """The gradient that strided_microbatch left in .grad, flattened; clears it for the next call."""
    out = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    for p in params:
        p.grad = None
    return out


def _exact_cfm_gradient(model, frozen, doc, anchors, s, params):
    """d/dtheta of (1/(B g)) sum_k ||E_y phi(x[:c_k] + y) - phi_gt,k||^2, enumerating all V^g blocks.

    E_{samples}[grad of the implementation's loss] must equal this: the per-sample reward
    2<phi_i, y> - 2/(n-1) sum_j <phi_i, phi_j> is exactly the REINFORCE reward of -L_CFM (paper eq. 2, 7).
    """
    g = s.generate_max_len
    total = 0.0
    for c in anchors:
        conts = torch.tensor(list(itertools.product(range(V), repeat=g)))  # [V^g, g]
        seqs = torch.cat([doc[:c].expand(len(conts), -1), conts], dim=1)
        logits = model(seqs).logits[:, c - 1 : c - 1 + g] / s.temperature
        logp = logits.log_softmax(-1).gather(-1, conts[..., None]).squeeze(-1).sum(-1)  # [V^g]
        with torch.no_grad():
            hs = frozen(seqs, torch.arange(seqs.shape[1]).expand(len(seqs), -1))
            phi = feat.combine_layers([h[:, -1] for h in hs], s.feature_norm)
            phi = torch.nn.functional.normalize(phi, dim=-1)
            gt_seq = doc[: c + g][None]
            hs_gt = frozen(gt_seq, torch.arange(c + g)[None])
            phi_gt = torch.nn.functional.normalize(
                feat.combine_layers([h[:, -1] for h in hs_gt], s.feature_norm), dim=-1
            )
        mu = (logp.exp()[:, None] * phi).sum(0)
        total = total + ((mu - phi_gt[0]) ** 2).sum()
    return _grads(total / (len(anchors) * g), params)


def test_policy_gradient_matches_exact_expected_reward_gradient():
    """Oracle (d): the mean gradient over many rollouts equals the exact gradient of L_CFM."""
    model = random_model()
    frozen = FeatureNetwork(model, feat.layer_indices([0.5, 1.0], 2))
    s = strided_settings(temperature=0.8)
    doc = torch.tensor([1, 3, 0, 2, 4, 1])
    batch = collate_documents([document_row(doc.tolist())], pad_token_id=0)
    totals = count_targets(batch, s)
    params = [p for p in model.parameters() if p.requires_grad]
    exact = _exact_cfm_gradient(model, frozen, doc, anchors=[2, 4], s=s, params=params)

    runs = 300
    mean = torch.zeros_like(exact)
    for seed in range(runs):
        gens = document_generators(seed, 0, 0, 1, "cpu")
        strided_microbatch(model, frozen, batch, s, totals, generators=gens)
        mean += _accumulated(params) / runs
    cos = torch.nn.functional.cosine_similarity(mean, exact, dim=0)
    rel = (mean - exact).norm() / exact.norm()
    # Monte-Carlo error at 300 x 8 rollouts is ~0.07; scoring step-1 tokens with the neighbouring
    # packed row (a plain shift by one) gives ~0.25, so the bound separates them.
    assert cos > 0.99 and rel < 0.15, (float(cos), float(rel))


def _loss_and_grad(model, frozen, rows_per_micro, s, seed=3):
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [collate_documents(rows, pad_token_id=0) for rows in rows_per_micro]
    counts = [count_targets(b, s) for b in batches]
    totals = StepTotals(sum(c.rl_tokens for c in counts), sum(c.ce_tokens for c in counts))
    loss, grad, first = 0.0, None, 0
    for b in batches:
        gens = document_generators(seed, 1, first, b.input_ids.shape[0], "cpu")
        first += b.input_ids.shape[0]
        res = strided_microbatch(model, frozen, b, s, totals, generators=gens)
        g = _accumulated(params)
        grad = g if grad is None else grad + g
        loss += res.loss
    return loss, grad


@pytest.mark.parametrize("whitening", [False, True])
def test_accumulation_invariance(whitening):
    """One micro-batch of 4 documents == 4 micro-batches of 1 (same rollouts, same update)."""
    model = random_model(vocab=11)
    frozen = FeatureNetwork(model, feat.layer_indices([0.5, 1.0], 2))
    s = strided_settings(n_samples_per_prompt=3, ce_coef=0.1, use_whitening=whitening)
    gen = torch.Generator().manual_seed(0)
    rows = [document_row(torch.randint(1, 11, (n,), generator=gen).tolist()) for n in (9, 12, 7, 10)]
    loss_a, grad_a = _loss_and_grad(model, frozen, [rows], s)
    loss_b, grad_b = _loss_and_grad(model, frozen, [[r] for r in rows], s)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert torch.allclose(grad_a, grad_b, atol=1e-6, rtol=1e-4)


def test_padding_invariance():
    """A document padded next to a longer one gets the same rollouts, log-probs and rewards as alone."""
    model = random_model(vocab=11)
    frozen = FeatureNetwork(model, feat.layer_indices([1.0], 2))
    s = strided_settings(n_samples_per_prompt=4, ce_coef=0.05, embed_method="mean_pooling")
    short = document_row([3, 5, 1, 7, 2, 9, 4, 4])
    long = document_row([3, 5, 1, 7, 2, 9, 4, 4, 6, 1, 2, 3, 8, 5, 5])
    records = []
    for rows in ([short], [short, long]):
        batch = collate_documents(rows, pad_token_id=0)
        gens = document_generators(7, 1, 0, len(rows), "cpu")
        res = strided_microbatch(model, frozen, batch, s, count_targets(batch, s), generators=gens, keep_rollouts=True)
        records.append(res.rollouts[0])
    alone, padded = records
    assert len(alone["input_ids"]) == 8 and len(padded["input_ids"]) == 15  # 7 pad tokens appended
    assert alone["anchors"] == padded["anchors"] == [2, 4, 6]  # (8 - 2 - 2) // 2 + 1 = 3 blocks
    for sample_a, sample_p in zip(alone["samples"], padded["samples"], strict=False):
        for blk_a, blk_p in zip(sample_a, sample_p, strict=False):
            assert blk_a["tokens"] == blk_p["tokens"]
            for key in ("logprobs", "alignment", "diversity", "reward", "advantage"):
                assert blk_a[key] == pytest.approx(blk_p[key], abs=1e-5), key


def test_identical_samples_give_zero_advantage_and_zero_rl_gradient():
    """Greedy rollouts are identical across samples, so every rloo advantage and the RL gradient vanish."""
    model = random_model(vocab=11)
    frozen = FeatureNetwork(model, feat.layer_indices([0.5], 2))
    s = strided_settings(n_samples_per_prompt=3, temperature=0.0)
    batch = collate_documents([document_row([1, 2, 3, 4, 5, 6, 7, 8, 9])], 0)
    res = strided_microbatch(model, frozen, batch, s, count_targets(batch, s), keep_rollouts=True)
    advs = [blk["advantage"] for sample in res.rollouts[0]["samples"] for blk in sample]
    # Identical rollouts agree only up to float rounding of their separate packed positions.
    assert advs and max(abs(a) for a in advs) < 1e-6
    grads = _accumulated([p for p in model.parameters() if p.requires_grad])
    assert grads.abs().max() < 1e-6


def test_ce_is_teacher_forced_nll_of_each_documents_labelled_tokens_once():
    """Oracle: the strided CE (its sum, the loss value and the gradient) is the plain teacher-forced NLL of
    every document's labelled tokens, each document counted once although its n samples share the row."""
    model = random_model(vocab=11)
    frozen = FeatureNetwork(model, feat.layer_indices([1.0], 2))
    s = strided_settings(n_samples_per_prompt=3, rl_coef=0.0, ce_coef=0.7)
    params = [p for p in model.parameters() if p.requires_grad]
    # Document 0: a 3-token prompt (no labels) and 6 labelled tokens; document 1: raw text, one shorter, so
    # the batch pads it by one token.
    doc0, doc1 = [3, 5, 1, 7, 2, 9, 4, 4, 6], [2, 8, 8, 1, 5, 3, 10, 6]
    labels0 = [-100] * 3 + doc0[3:]
    rows = [{"input_ids": doc0, "labels": labels0, "prompt_length": 3}, document_row(doc1)]
    batch = collate_documents(rows, pad_token_id=0)
    totals = count_targets(batch, s)
    # Targets are labelled tokens after the first position: 6 in document 0 and 8 - 1 = 7 in document 1.
    assert totals.ce_tokens == 13
    assert count_targets(batch, dataclasses.replace(s, ce_coef=0.0)).ce_tokens == 0  # no CE term, no CE targets
    res = strided_microbatch(model, frozen, batch, s, totals, generators=document_generators(0, 1, 0, 2, "cpu"))
    got = _accumulated(params)
    assert res.rollouts == []  # records only when asked for

    nll = 0.0
    for ids, labels in ((doc0, labels0), (doc1, doc1)):
        labelled = torch.tensor(labels[1:]) != -100
        nll = nll - teacher_forced_logp(model, ids)[labelled].sum()
    want = _grads(0.7 * nll / 13, params)
    assert res.stats.ce_sum == pytest.approx(float(nll.detach()), rel=1e-5)
    assert res.stats.ce_tokens == 13
    assert res.loss == pytest.approx(0.7 * float(nll.detach()) / 13, rel=1e-5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_rl_gradient_is_token_weighted_over_documents_with_different_block_counts():
    """Oracle: the RL gradient is -sum over every generated token of the step of A * grad log p, divided by
    the step's generated-token count, with each log-prob taken from a plain forward of x[:c_k] + block.
    The two documents have 4 and 2 blocks, so a per-document mean would weight their tokens differently."""
    model = random_model(vocab=11)
    frozen = FeatureNetwork(model, feat.layer_indices([0.5, 1.0], 2))
    s = strided_settings(n_samples_per_prompt=3, generate_max_len=3, temperature=0.8)
    params = [p for p in model.parameters() if p.requires_grad]
    docs = [[3, 5, 1, 7, 2, 9, 4, 4, 6, 1, 2, 8], [2, 8, 8, 1, 5, 3, 10]]
    batch = collate_documents([document_row(d) for d in docs], pad_token_id=0)
    totals = count_targets(batch, s)
    # Context 2, stride 2, g 3: document 0 (12 tokens) anchors 2, 4, 6, 8 (8 + 3 <= 12); document 1 (7 tokens)
    # anchors 2, 4 (4 + 3 <= 7). Generated tokens: (4 + 2) blocks x 3 samples x 3 tokens = 54.
    assert totals.rl_tokens == 54
    gens = document_generators(5, 1, 0, 2, "cpu")
    res = strided_microbatch(model, frozen, batch, s, totals, generators=gens, keep_rollouts=True)
    got = _accumulated(params)

    assert [r["anchors"] for r in res.rollouts] == [[2, 4, 6, 8], [2, 4]]
    assert [r["length"] for r in res.rollouts] == [12, 7]
    assert [r["input_ids"] for r in res.rollouts] == [docs[0], docs[1] + [0] * 5]  # as collated: padded
    loss, advs = 0.0, []
    for doc, record in zip(docs, res.rollouts, strict=True):
        for sample in record["samples"]:
            for c, block in zip(record["anchors"], sample, strict=True):
                logp = teacher_forced_logp(model, doc[:c] + block["tokens"], temperature=0.8)[c - 1 :]
                loss = loss - block["advantage"] * logp.sum()
                advs.append(block["advantage"])
    assert len(advs) == 18 and min(abs(a) for a in advs) > 1e-4  # every block carries a gradient
    want = _grads(loss / 54, params)
    assert res.stats.rl_sum == pytest.approx(float(loss.detach()), rel=1e-4)
    assert res.stats.ce_tokens == res.stats.ce_sum == 0.0  # no CE term
    assert res.loss == pytest.approx(float(loss.detach()) / 54, rel=1e-4)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_microbatch_sums_add_up_what_the_rollout_records_show():
    """The metric sums of a micro-batch against its own rollout records, and the logged CFM loss against
    the identity it has with the reward terms for unit features (no whitening): with phi_i and phi_gt unit,
    ||mean phi - phi_gt||^2 = (n + (n - 1)/2 sum_i d_i) / n^2 - mean_i a_i + 1, since sum_{i != j} <phi_i, phi_j>
    = (n - 1)/2 sum_i d_i and a_i = 2 <phi_i, phi_gt>."""
    model = random_model(vocab=11)
    frozen = FeatureNetwork(model, feat.layer_indices([0.5, 1.0], 2))
    n, g = 3, 3
    s = strided_settings(n_samples_per_prompt=n, generate_max_len=g, ce_coef=0.2, diversity_coef=0.5)
    docs = [[3, 5, 1, 7, 2, 9, 4, 4, 6, 1, 2, 8], [2, 8, 8, 1, 5, 3, 10]]
    rows = [{"input_ids": docs[0], "labels": [-100] * 4 + docs[0][4:], "prompt_length": 4}, document_row(docs[1])]
    batch = collate_documents(rows, pad_token_id=0)
    res = strided_microbatch(
        model,
        frozen,
        batch,
        s,
        count_targets(batch, s),
        generators=document_generators(2, 1, 0, 2, "cpu"),
        keep_rollouts=True,
    )
    # Per document, per block: its n samples' records.
    blocks = [list(zip(*r["samples"], strict=True)) for r in res.rollouts]
    flat = [b for per_block in blocks for group in per_block for b in group]
    num_blocks = sum(len(b) for b in blocks)
    # Document 0: first anchor max(2, 4 + 0) = 4, anchors 4, 6, 8 (8 + 3 <= 12); document 1: anchors 2, 4.
    assert [r["anchors"] for r in res.rollouts] == [[4, 6, 8], [2, 4]] and num_blocks == 5
    sums = res.stats
    assert (sums.blocks, sums.docs, sums.samples) == (5, 2, 5 * n)
    assert sums.rl_tokens == 5 * n * g
    assert sums.ce_tokens == 8 + 6  # labelled targets after position 0: 8 in document 0, 6 in document 1
    assert sums.doc_tokens == 12 + 7
    for key in ("alignment", "diversity", "reward", "advantage"):
        assert getattr(sums, key) == pytest.approx(sum(b[key] for b in flat), abs=1e-4), key
    assert sums.advantage_sq == pytest.approx(sum(b["advantage"] ** 2 for b in flat), abs=1e-4)
    for b in flat:  # reward = alignment_coef * a - diversity_coef * d
        assert b["reward"] == pytest.approx(b["alignment"] - 0.5 * b["diversity"], abs=1e-5)
    cfm = 0.0
    for per_block in blocks:
        for group in per_block:
            a = [x["alignment"] for x in group]
            d = [x["diversity"] for x in group]
            cfm += (n + (n - 1) / 2 * sum(d)) / n**2 - sum(a) / n + 1
    assert sums.cfm == pytest.approx(cfm, abs=1e-4)
    # The loss value: rl_coef * RL / generated tokens + ce_coef * CE / labelled targets.
    assert res.loss == pytest.approx(sums.rl_sum / (5 * n * g) + 0.2 * sums.ce_sum / 14, rel=1e-6)


def test_one_generated_token_and_one_ce_target_are_divided_by_one():
    """The smallest step: one block of one token, one sample, one labelled target. Its loss is the raw sums."""
    model = random_model(vocab=11)
    frozen = FeatureNetwork(model, feat.layer_indices([1.0], 2))
    s = strided_settings(n_samples_per_prompt=1, generate_max_len=1, ce_coef=0.5, advantage_estimator="reinforce")
    batch = collate_documents([{"input_ids": [3, 5, 1], "labels": [-100, -100, 1]}], pad_token_id=0)
    totals = count_targets(batch, s)
    assert (totals.rl_tokens, totals.ce_tokens) == (1, 1)  # block [2, 3); target x_2
    params = [p for p in model.parameters() if p.requires_grad]
    gens = document_generators(0, 1, 0, 1, "cpu")
    res = strided_microbatch(model, frozen, batch, s, totals, generators=gens, keep_rollouts=True)
    got = _accumulated(params)
    assert res.loss == pytest.approx(res.stats.rl_sum + 0.5 * res.stats.ce_sum, rel=1e-6)
    ((block,),) = res.rollouts[0]["samples"]
    ce = -teacher_forced_logp(model, [3, 5, 1])[1]
    rl = -block["advantage"] * teacher_forced_logp(model, [3, 5, *block["tokens"]])[1]
    assert res.stats.ce_sum == pytest.approx(float(ce.detach()), rel=1e-5)
    torch.testing.assert_close(got, _grads(rl + 0.5 * ce, params), atol=1e-6, rtol=1e-4)  # divided by 1 and 1


def _block_feature(hidden_states, layers, positions, norm, method, completion):
    """Oracle pooling of one block from a plain forward's hidden states: [E'] (float64).

    hidden_states: the model's output_hidden_states of one sequence; positions: the block's g positions in it;
    completion: [g] bool, the block's labelled ground-truth positions (completion_mean only).
    """
    per_layer = [hidden_states[i][0, positions].double() for i in layers]  # each [g, H]
    if norm == "per_layer":
        tokens = torch.cat([torch.nn.functional.normalize(h, dim=-1) for h in per_layer], dim=-1)
    else:  # joint
        tokens = torch.nn.functional.normalize(torch.cat(per_layer, dim=-1), dim=-1)
    g = tokens.shape[0]
    if method == "completion_mean":
        return tokens[completion].mean(0) if completion.any() else torch.zeros(tokens.shape[1], dtype=tokens.dtype)
    if method == "mean_pooling":
        return tokens.mean(0)
    return torch.cat([tokens[(q * g) // 4] for q in (1, 2, 3)])  # concat: floor(q g / 4), q = 1, 2, 3


@pytest.mark.parametrize(
    ("method", "norm", "whitening", "estimator"),
    [("completion_mean", "joint", None, "rloo"), ("concat", "per_layer", "sample", "group_norm")],
)
def test_scores_equal_per_block_features_from_plain_forwards(method, norm, whitening, estimator):
    """Oracle: every (document, block) group scores as if its ground-truth window and each sample's block had
    been run through the model on their own (x[:c_k + g] and x[:c_k] + block, causal), pooled and scored."""
    from ebft import rewards
    from ebft.strided.step import roll_out, score_rollouts

    model = random_model(vocab=11)
    layers = feat.layer_indices([0.5, 1.0], 2)  # hidden states 1 and 2
    frozen = FeatureNetwork(model, layers)
    n, g = 3, 4
    s = strided_settings(
        n_samples_per_prompt=n,
        generate_max_len=g,
        stride=3,
        embed_method=method,
        feature_norm=norm,
        use_whitening=whitening is not None,
        whitening_space=whitening or "feature",
        advantage_estimator=estimator,
        alignment_coef=1.3,
        diversity_coef=0.6,
    )
    # No prompt, so the anchors start at context_length 2, but the first 5 labels are -100 (an unlabelled
    # turn): block 0 [2, 6) has 1 labelled position, block 1 [5, 9) 4, and document 1's block [2, 6) none.
    docs = [[3, 5, 1, 7, 2, 9, 4, 4, 6, 1, 2, 8], [2, 8, 8, 1, 5, 3, 10]]
    labels = [[-100] * 5 + docs[0][5:], [-100] * 7]
    rows = [{"input_ids": d, "labels": lab} for d, lab in zip(docs, labels, strict=True)]
    batch = collate_documents(rows, pad_token_id=0)
    with torch.no_grad():
        r = roll_out(model, batch, s, generators=document_generators(4, 1, 0, 2, "cpu"))
        scores = score_rollouts(frozen, r.packed, r.plan, r.positions, r.layout, batch.labels, s)
    # Document 0 (12 tokens): anchors 2, 5, 8 (8 + 4 <= 12); document 1 (7 tokens): anchor 2 only.
    assert r.layout.valid.tolist() == [[True, True, True], [True, False, False]]

    gen_vecs, gt_vecs = [], []
    with torch.no_grad():
        for d in range(2):
            for k in range(int(r.layout.valid[d].sum())):
                c = int(r.layout.anchors[d, k])
                window = list(range(c, c + g))
                completion = torch.tensor([labels[d][p] != -100 for p in window])
                hs = model(torch.tensor([docs[d][: c + g]]), output_hidden_states=True).hidden_states
                gt_vecs.append(_block_feature(hs, layers, window, norm, method, completion))
                for i in range(n):
                    seq = torch.cat([torch.tensor(docs[d][:c]), r.tokens[d, i, k]])[None]
                    hs = model(seq, output_hidden_states=True).hidden_states
                    gen_vecs.append(_block_feature(hs, layers, window, norm, method, completion))
    gen = torch.stack(gen_vecs).reshape(4, n, -1).float()
    gt = torch.stack(gt_vecs).float()
    terms = rewards.reward_terms(
        gen,
        gt,
        alignment_coef=1.3,
        diversity_coef=0.6,
        use_whitening=s.use_whitening,
        whitening_space=s.whitening_space,
    )
    adv = rewards.advantages(terms, estimator, 1.3, 0.6)
    slots = [(0, 0), (0, 1), (0, 2), (1, 0)]  # the valid (document, block) pairs, in group order
    atol = 2e-3 if s.use_whitening else 1e-4  # whitening divides by singular values, so packed-row rounding grows
    for name, want in (("alignment", terms.alignment), ("diversity", terms.diversity), ("reward", terms.reward)):
        got = torch.stack([getattr(scores, name)[d, :, k] for d, k in slots])
        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=name)
    torch.testing.assert_close(torch.stack([scores.advantage[d, :, k] for d, k in slots]), adv, atol=10 * atol, rtol=0)
    torch.testing.assert_close(torch.stack([scores.cfm[d, k] for d, k in slots]), terms.cfm, atol=atol, rtol=0)
    # Slots without a block score zero.
    for name in ("alignment", "diversity", "reward", "advantage"):
        assert not getattr(scores, name)[1, :, 1:].any(), name
    assert not scores.cfm[1, 1:].any()

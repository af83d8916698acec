"""The structured step against independent computations on the tiny model (docs/design.md §5, §6, §10).

Rewards are recomputed from ``output_hidden_states`` of a separately loaded model, one unpadded sequence
at a time; log-probs and gradients from plain teacher-forced forwards; the loss pieces from hand
arithmetic; multi-turn rollouts and adaptive caps through a fake backend that records every call.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from ebft import features as feat
from ebft import losses, rewards
from ebft.config import TrlSection
from ebft.data.structured import prompt_row
from ebft.modeling.feature_network import FeatureNetwork
from ebft.sampling import truncation_keep
from ebft.structured.hf import HFGenerate, cut_completion
from ebft.structured.rollout import Completion, Sample, Sampling, loss_token_count
from ebft.structured.scoring import Scores, score
from ebft.structured.settings import ADAPTIVE_FLOOR, StructuredSettings, completion_cap
from ebft.structured.stats import StructuredStats
from ebft.structured.step import (
    RolloutBuffer,
    _single_turn,
    ce_sequences,
    microbatch,
    old_logprobs,
    policy_logprobs,
    roll_out,
)

SEQ_LEN = 256
MAX_COMPLETION = 64


# ---------------------------------------------------------------------------------------------
# Helpers


def _settings(tok, **over) -> StructuredSettings:
    base = {
        "num_generations": 3,
        "max_completion_length": MAX_COMPLETION,
        "adaptive_max_tokens": False,
        "gt_length_multiplier": 1.5,
        "sampling": Sampling(temperature=1.0, stop_token_ids=(tok.eos_token_id,)),
        "embed_method": "last_token",
        "feature_norm": "per_layer",
        "use_whitening": False,
        "whitening_space": "feature",
        "alignment_coef": 1.0,
        "diversity_coef": 1.0,
        "scale_rewards": "group",
        "loss_type": "grpo",
        "eps_low": 0.2,
        "eps_high": 0.2,
        "num_iterations": 1,
        "mask_truncated_completions": False,
        "skip_zero_advantage_batches": False,
        "is_correction": False,
        "is_bounds": (1 / 3.0, 3.0),
        "rl_coef": 1.0,
        "ce_coef": 0.0,
        "sequence_len": SEQ_LEN,
    }
    base.update(over)
    return StructuredSettings(**base)


def _row(tok, prompt, ground_truth, remaining=()):
    return prompt_row(
        {"prompt": prompt, "ground_truth": ground_truth, "remaining_turns": list(remaining)},
        tok,
        sequence_len=SEQ_LEN,
        max_completion_length=MAX_COMPLETION,
        chat_template_kwargs=None,
        source="test",
    )


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _load(model_dir, lm_head_scale: float = 1.0):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.float()
    if lm_head_scale != 1.0:
        with torch.no_grad():  # a peakier policy than the near-uniform random init
            model.lm_head.weight.mul_(lm_head_scale)
    return model


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """A separately loaded copy of the tiny model: the oracle side, never trained or wrapped."""
    return _load(tiny_model_dir).eval()


class FakeBackend:
    """Deterministic, prompt-dependent completions that say where they came from; records every call.

    The reply to a context is ``re {tag} s{j} t{turn}``: ``tag`` is the first word of the context's first
    user message, ``turn`` the number of replies already in the context, ``j`` the sample index (first
    turn) or the sample index of the replies already there. Completions end with EOS unless ``unfinished``
    says otherwise for (tag, j, turn); they are cut at ``max_tokens``.
    """

    REPLY = re.compile(r"re (\w+) s(\d+) t(\d+)")

    def __init__(self, tok, unfinished=()):
        self.tok = tok
        self.calls: list[dict] = []
        self.unfinished = set(unfinished)

    def generate(self, prompts, n, max_tokens, seeds):
        self.calls.append(
            {"prompts": [list(p) for p in prompts], "n": n, "max_tokens": list(max_tokens), "seeds": list(seeds)}
        )
        out = []
        for prompt, cap in zip(prompts, max_tokens, strict=True):
            text = self.tok.decode(prompt, skip_special_tokens=False)
            tag = re.search(r"<\|user\|>\n(\w+)", text).group(1)
            earlier = self.REPLY.findall(text)
            group = []
            for j in range(n):
                sample = int(earlier[-1][1]) if earlier else j
                turn = len(earlier)
                ids = _ids(self.tok, f"re {tag} s{sample} t{turn}")
                finished = (tag, sample, turn) not in self.unfinished
                if finished:
                    ids = [*ids, self.tok.eos_token_id]
                group.append(Completion(ids=tuple(ids[:cap]), finished=finished and len(ids) <= cap))
            out.append(group)
        return out

    def sync(self, model, step):
        pass

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------
# 1. Rewards and advantages against hidden states read directly from the model


def _oracle_pool(model, seq: list[int], prompt_length: int, fractions, method: str, norm: str) -> torch.Tensor:
    """Pooled feature of one unpadded sequence, from output_hidden_states (float64)."""
    with torch.no_grad():
        hidden = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
    num_layers = model.config.num_hidden_layers
    layers = [hidden[int(f * num_layers)][0].double() for f in fractions]  # each [T, H]
    if norm == "per_layer":  # each chosen layer L2-normalised per token, then concatenated -> [T, F * H]
        tokens = torch.cat([torch.nn.functional.normalize(h, dim=-1) for h in layers], dim=-1)
    elif norm == "joint":  # the concatenation normalised per token
        tokens = torch.nn.functional.normalize(torch.cat(layers, dim=-1), dim=-1)
    else:  # none: concatenated as they are
        tokens = torch.cat(layers, dim=-1)
    n = len(seq)
    if method == "last_token":
        return tokens[n - 1]
    if method == "mean_pooling":
        return tokens.mean(0)
    if method == "completion_mean":
        return tokens[prompt_length:].mean(0)
    assert method == "concat"
    return torch.cat([tokens[(k * n) // 4] for k in (1, 2, 3)])


def _scoring_batch(tok):
    """Two prompts of different lengths, three completions each of different lengths, some with EOS."""
    rows = [
        _row(tok, [_user("def add(a, b):")], "    return a + b"),
        _row(
            tok,
            [_user("Write a loop that prints the numbers from one to ten, one per line.")],
            "for i in range(1, 11):\n    print(i)",
        ),
    ]
    texts = [
        ["    return a - b", "    pass", "    return sum([a, b]) if a else b"],
        ["print(1)", "for i in range(10): print(i + 1)", "while True:\n    break"],
    ]
    eos = tok.eos_token_id
    comps = [
        [Completion(tuple(_ids(tok, t) + ([eos] if j != 1 else [])), finished=j != 1) for j, t in enumerate(group)]
        for group in texts
    ]
    return rows, texts, comps


@pytest.mark.parametrize(
    ("method", "norm"),
    [("last_token", "per_layer"), ("mean_pooling", "joint"), ("completion_mean", "none"), ("concat", "per_layer")],
)
@pytest.mark.parametrize("whitening", [False, True])
def test_score_matches_rewards_from_output_hidden_states(
    tiny_model_dir, tiny_tokenizer, reference, method, norm, whitening
):
    tok = tiny_tokenizer
    fractions = [0.25, 0.5, 1.0]  # hidden-state indices int(f * 4) = 1, 2, 4 (4 = after the final norm)
    # Both whitening spaces, without more cases: they differ in the ground truth's whitened vector.
    space = "sample" if method in ("mean_pooling", "concat") else "feature"
    s = _settings(
        tok,
        embed_method=method,
        feature_norm=norm,
        use_whitening=whitening,
        whitening_space=space,
        alignment_coef=1.3,
        diversity_coef=0.7,
    )
    rows, texts, comps = _scoring_batch(tok)
    samples = [_single_turn(row, c, s, tok) for row, group in zip(rows, comps, strict=True) for c in group]
    # What the feature network pools: prompt + completion content, without the stop token.
    expected_seqs = [list(row.prompt_ids) + _ids(tok, t) for row, group in zip(rows, texts, strict=True) for t in group]
    assert [q.sequence[: q.feature_length] for q in samples] == expected_seqs

    policy = _load(tiny_model_dir)
    network = FeatureNetwork(policy, feat.layer_indices(fractions, 4))
    scores = score(network, rows, samples, s, tok.pad_token_id, batch_size=4)  # 6 sequences: two padded batches

    P, G = 2, 3
    gen = torch.stack(
        [
            _oracle_pool(reference, seq, q.prompt_length, fractions, method, norm)
            for seq, q in zip(expected_seqs, samples, strict=True)
        ]
    ).reshape(P, G, -1)
    gt = torch.stack(
        [
            _oracle_pool(
                reference, list(r.prompt_ids) + _ids(tok, r.ground_truth), len(r.prompt_ids), fractions, method, norm
            )
            for r in rows
        ]
    )
    if whitening:
        want = rewards.reward_terms(
            gen.float(), gt.float(), alignment_coef=1.3, diversity_coef=0.7, use_whitening=True, whitening_space=space
        )
        alignment, diversity, reward, cfm = want.alignment, want.diversity, want.reward, want.cfm
    else:
        phi = torch.nn.functional.normalize(gen, dim=-1)
        phi_gt = torch.nn.functional.normalize(gt, dim=-1)
        alignment = torch.zeros(P, G, dtype=torch.float64)
        diversity = torch.zeros(P, G, dtype=torch.float64)
        cfm = torch.zeros(P, dtype=torch.float64)
        for p in range(P):
            for j in range(G):
                alignment[p, j] = 2 * torch.dot(phi[p, j], phi_gt[p])  # 2 cos: both are unit vectors
                others = sum(torch.dot(phi[p, j], phi[p, k]) for k in range(G) if k != j)
                diversity[p, j] = 2 / (G - 1) * others
            cfm[p] = ((phi[p].mean(0) - phi_gt[p]) ** 2).sum()
        reward = 1.3 * alignment - 0.7 * diversity
    torch.testing.assert_close(scores.alignment.double(), alignment.double(), atol=2e-5, rtol=0)
    torch.testing.assert_close(scores.diversity.double(), diversity.double(), atol=2e-5, rtol=0)
    torch.testing.assert_close(scores.reward.double(), reward.double(), atol=3e-5, rtol=0)
    torch.testing.assert_close(scores.cfm.double(), cfm.double(), atol=2e-5, rtol=0)
    # scale_rewards group: (r - group mean) / (unbiased group std + 1e-4)
    for p in range(P):
        r = [float(v) for v in scores.reward[p]]
        mean, std = statistics.mean(r), statistics.stdev(r)
        for j in range(G):
            assert float(scores.advantage[p, j]) == pytest.approx((r[j] - mean) / (std + 1e-4), abs=1e-5)


def test_score_batch_and_none_scaling(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    rows, _, comps = _scoring_batch(tok)
    network = FeatureNetwork(_load(tiny_model_dir), feat.layer_indices([0.5, 1.0], 4))
    seen = []

    def batch_std(reward):
        seen.append(reward.clone())
        return 0.25

    s = _settings(tok, scale_rewards="batch")
    samples = [_single_turn(row, c, s, tok) for row, group in zip(rows, comps, strict=True) for c in group]
    batch = score(network, rows, samples, s, tok.pad_token_id, batch_size=8, batch_std=batch_std)
    none = score(network, rows, samples, replace(s, scale_rewards="none"), tok.pad_token_id, batch_size=8)
    torch.testing.assert_close(seen[0], batch.reward)  # batch_std sees this batch's rewards
    centred = batch.reward - batch.reward.mean(-1, keepdim=True)
    torch.testing.assert_close(batch.advantage, centred / (0.25 + 1e-4))
    torch.testing.assert_close(none.advantage, centred)


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


# ---------------------------------------------------------------------------------------------
# 2. Clipped surrogate and aggregation by hand


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


# ---------------------------------------------------------------------------------------------
# 3. On-policy gradient == REINFORCE gradient


def _training_batch(tok, s):
    """Two prompts x two completions of different lengths (one without EOS), and their advantages."""
    rows = [
        _row(tok, [_user("def square(x):")], "    return x * x"),
        _row(tok, [_user("Sort a list of numbers in place, then print it.")], "xs.sort()\nprint(xs)"),
    ]
    texts = [["    return x ** 2", "    x"], ["xs = sorted(xs)", "print(sorted(xs))\n# done"]]
    eos = tok.eos_token_id
    comps = [
        Completion(tuple(_ids(tok, t) + ([eos] if k != 1 else [])), finished=k != 1)
        for k, t in enumerate(sum(texts, []))
    ]
    samples = [_single_turn(rows[i // 2], c, s, tok) for i, c in enumerate(comps)]
    advantage = torch.tensor([0.7, -1.3, 0.4, 0.9])
    zeros = torch.zeros(2, 2)
    buffer = RolloutBuffer(
        rows, samples, Scores(zeros, zeros, zeros, advantage.reshape(2, 2), zeros[:, 0]), advantage, 0
    )
    return buffer


def _teacher_forced_logp(model, seq: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(seq[t] | seq[:t]) for t = 1..T-1 from a plain forward of the unpadded sequence: [T - 1]."""
    ids = torch.tensor([seq])
    logits = model(ids).logits[0, :-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]


def _flat_grad(params):
    out = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    for p in params:
        p.grad = None
    return out


def _run_step(model, buffer, s, tok, splits, ce_tokens=0):
    """microbatch over ``splits`` (lists of completion indices) with step-global norms; returns their statistics."""
    norm = losses.LossNorm(
        sequences=len(buffer.samples),
        tokens=sum(sum(q.loss_mask[1:]) for q in buffer.samples),
        max_completion_length=s.max_completion_length,
        micro_batches=len(splits),
    )
    out = []
    for idx in splits:
        ce_rows = [i // s.num_generations for i in idx if i % s.num_generations == 0]
        out.append(microbatch(model, buffer, idx, ce_rows, s, norm, ce_tokens, tok, pad_id=tok.pad_token_id))
    return out


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_on_policy_gradient_is_reinforce(tiny_model_dir, tiny_tokenizer, loss_type, temperature):
    tok = tiny_tokenizer
    s = _settings(
        tok, num_generations=2, loss_type=loss_type, sampling=Sampling(temperature, stop_token_ids=(tok.eos_token_id,))
    )
    model = _load(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    buffer = _training_batch(tok, s)
    splits = [[0, 1], [2, 3]]
    sums = _run_step(model, buffer, s, tok, splits)
    got = _flat_grad(params)

    # Independent: -(sum_i A_i sum_t logp_it) / norm, each completion forwarded on its own. The loss
    # value itself is the same expression with every logp replaced by the ratio, 1.
    N = len(buffer.samples)
    tokens = sum(sum(q.loss_mask[1:]) for q in buffer.samples)
    total, value = 0.0, 0.0
    for split in splits:
        split_tokens = sum(sum(buffer.samples[i].loss_mask[1:]) for i in split)
        for i in split:
            q, a = buffer.samples[i], float(buffer.advantage[i])
            logp = _teacher_forced_logp(model, q.sequence, temperature)[torch.tensor(q.loss_mask[1:])]
            for x, ratio in ((logp, False), (torch.ones_like(logp), True)):
                if loss_type == "dapo":  # token mean over the step
                    term = -a * x.sum() / tokens
                elif loss_type == "grpo":  # mean over completions of each completion's token mean
                    term = -a * x.mean() / N
                elif loss_type == "dr_grpo":  # token sum / (completions x max_completion_length)
                    term = -a * x.sum() / (N * MAX_COMPLETION)
                else:  # bnpo: mean over micro-batches of each micro-batch's token mean
                    term = -a * x.sum() / split_tokens / len(splits)
                if ratio:
                    value += float(term)
                else:
                    total = total + term
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)])
    assert float(want.abs().max()) > 1e-3
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # On-policy nothing is clipped; the summed micro-batch losses are the step loss (rl_coef 1: the RL loss).
    assert sum(p.clip_low + p.clip_high for p in sums) == 0
    assert sum(p.loss for p in sums) == pytest.approx(value, rel=1e-5)
    assert sum(p.rl_loss for p in sums) == pytest.approx(value, rel=1e-5)
    # Per micro-batch: its loss tokens, and the entropy of the sampler's distribution summed over them.
    for split, part in zip(splits, sums, strict=True):
        assert part.rl_tokens == sum(sum(buffer.samples[i].loss_mask[1:]) for i in split)
        entropy = 0.0
        for i in split:
            q = buffer.samples[i]
            with torch.no_grad():
                logits = model(torch.tensor([q.sequence])).logits[0, :-1].float() / temperature
            logp_all = logits.log_softmax(-1)[torch.tensor(q.loss_mask[1:])]
            entropy += float(-(logp_all.exp() * logp_all).sum())
        assert part.entropy == pytest.approx(entropy, rel=1e-4)


def test_zero_advantage_micro_batches_are_skipped_when_asked(tiny_model_dir, tiny_tokenizer):
    """skip_zero_advantage_batches: a micro-batch whose advantages are all 0 runs no policy pass, adds no
    gradient and says so; the others train as usual (dapo: divided by the step's token count)."""
    tok = tiny_tokenizer
    s = _settings(tok, num_generations=2, loss_type="dapo", skip_zero_advantage_batches=True)
    model = _load(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    buffer = _training_batch(tok, s)
    # The first micro-batch has nothing to learn; the second has one zero and one non-zero advantage.
    buffer.advantage = torch.tensor([0.0, 0.0, 0.0, 0.9])

    assert _run_step(model, buffer, s, tok, [[0, 1]]) == [StructuredStats(skipped_micro_batches=1.0)]
    assert all(p.grad is None for p in params)  # no pass at all, not even one with weight 0

    sums = _run_step(model, buffer, s, tok, [[0, 1], [2, 3]])
    assert sums[0] == StructuredStats(skipped_micro_batches=1.0) and sums[1].skipped_micro_batches == 0
    got = _flat_grad(params)
    tokens = sum(sum(q.loss_mask[1:]) for q in buffer.samples)
    total = 0.0
    for i in (2, 3):
        q = buffer.samples[i]
        logp = _teacher_forced_logp(model, q.sequence)[torch.tensor(q.loss_mask[1:])]
        total = total - float(buffer.advantage[i]) * logp.sum() / tokens
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)

    # Without the flag the zero-advantage micro-batch runs (its tokens count) and adds a zero gradient.
    sums = _run_step(model, buffer, replace(s, skip_zero_advantage_batches=False), tok, [[0, 1], [2, 3]])
    assert sums[0].skipped_micro_batches == 0 and sums[0].rl_tokens > 0
    torch.testing.assert_close(_flat_grad(params), want, atol=1e-6, rtol=1e-4)


def test_stored_old_logprobs_give_the_same_first_iteration_gradient(tiny_model_dir, tiny_tokenizer):
    """num_iterations > 1: the first step trains against log-probs stored when the batch was made;
    with unchanged weights the ratio is 1 and the gradient is the on-policy one."""
    tok = tiny_tokenizer
    s = _settings(tok, num_generations=2, loss_type="dapo", num_iterations=2)
    model = _load(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    buffer = _training_batch(tok, s)
    _run_step(model, buffer, s, tok, [[0, 1], [2, 3]])
    on_policy = _flat_grad(params)
    buffer.old_logprobs = old_logprobs(model, buffer.samples, s, tok.pad_token_id, 2, None)
    # One stored tensor per completion, one value per loss token after the first position.
    assert [len(v) for v in buffer.old_logprobs] == [sum(q.loss_mask[1:]) for q in buffer.samples]
    _run_step(model, buffer, s, tok, [[0, 1], [2, 3]])
    torch.testing.assert_close(_flat_grad(params), on_policy, atol=1e-7, rtol=1e-5)

    # Stale log-probs (higher than now by log 2 on every token: ratio 0.5 < 1 - 0.2): completions with
    # A > 0 keep their gradient scaled by r = 0.5, completions with A < 0 are clipped (no gradient).
    buffer.old_logprobs = [v + math.log(2.0) for v in buffer.old_logprobs]
    sums = _run_step(model, buffer, s, tok, [[0, 1], [2, 3]])
    got = _flat_grad(params)
    tokens = sum(sum(q.loss_mask[1:]) for q in buffer.samples)
    total = 0.0
    for q, a in zip(buffer.samples, buffer.advantage.tolist(), strict=True):
        if a > 0:
            logp = _teacher_forced_logp(model, q.sequence)[torch.tensor(q.loss_mask[1:])]
            total = total - 0.5 * a * logp.sum() / tokens
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    negative = [i for i, a in enumerate(buffer.advantage.tolist()) if a < 0]
    assert sum(p.clip_low for p in sums) == sum(sum(buffer.samples[i].loss_mask[1:]) for i in negative)


def test_ce_runs_under_the_training_autocast_and_divides_by_the_steps_targets(tiny_model_dir, tiny_tokenizer):
    """The CE pass runs under the step's autocast (bf16 here), and its NLL is divided by the step's CE target
    count as given, however small (1 here: the loss is then the raw sum)."""
    tok = tiny_tokenizer
    s = _settings(tok, num_generations=2, loss_type="dapo", rl_coef=0.0, ce_coef=0.5)
    model = _load(tiny_model_dir)
    buffer = _training_batch(tok, s)
    norm = losses.LossNorm(sequences=4, tokens=1, max_completion_length=MAX_COMPLETION, micro_batches=1)
    bf16 = microbatch(
        model, buffer, [0, 1, 2, 3], [0, 1], s, norm, 1, tok, pad_id=tok.pad_token_id, autocast_dtype=torch.bfloat16
    )
    refs = ce_sequences(buffer.rows, tok, s)
    with torch.no_grad():
        nll_bf16 = -float(policy_logprobs(model, refs, s, tok.pad_token_id, autocast_dtype=torch.bfloat16)[0].sum())
        nll_fp32 = -float(policy_logprobs(model, refs, s, tok.pad_token_id)[0].sum())
    assert bf16.ce_sum == pytest.approx(nll_bf16, rel=1e-5)
    assert abs(nll_bf16 - nll_fp32) > 1e-3  # bf16 shows in the sum
    assert bf16.loss == pytest.approx(0.5 * bf16.ce_sum, rel=1e-6)  # divided by 1


def test_rl_and_ce_in_one_microbatch_add_up(tiny_model_dir, tiny_tokenizer):
    """Loss = rl_coef x surrogate + ce_coef x CE: with both on, one micro-batch's loss and gradient are the sums
    of the RL-only and CE-only runs on the same batch (each term's own value is checked elsewhere)."""
    tok = tiny_tokenizer
    model = _load(tiny_model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    runs = {}
    for name, rl, ce in (("both", 0.8, 0.5), ("rl", 0.8, 0.0), ("ce", 0.0, 0.5)):
        s = _settings(tok, num_generations=2, loss_type="dapo", rl_coef=rl, ce_coef=ce)
        buffer = _training_batch(tok, s)
        sums = _run_step(model, buffer, s, tok, [[0, 1, 2, 3]], ce_tokens=7)
        runs[name] = (sums[0].loss, _flat_grad(params))
    assert runs["rl"][0] != 0 and runs["ce"][0] != 0  # both terms are present in the sum below
    assert runs["both"][0] == pytest.approx(runs["rl"][0] + runs["ce"][0], rel=1e-5)
    torch.testing.assert_close(runs["both"][1], runs["rl"][1] + runs["ce"][1], atol=1e-6, rtol=1e-4)


def test_models_that_run_padded_get_the_same_ce_and_stored_logprobs(tiny_model_dir, tiny_tokenizer):
    """Eager attention cannot run packed, so the policy pass pads with the pad id: the CE and the stored
    log-probs are still each sequence's plain teacher-forced values."""
    from ebft.structured.forward import use_packed

    tok = tiny_tokenizer
    s = _settings(tok, num_generations=2, loss_type="dapo", rl_coef=0.0, ce_coef=0.5)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").float()
    assert not use_packed(model)
    buffer = _training_batch(tok, s)
    sums = _run_step(model, buffer, s, tok, [[0, 1], [2, 3]], ce_tokens=1)
    nll = 0.0
    with torch.no_grad():
        for r in buffer.rows:
            seq = list(r.prompt_ids) + _ids(tok, r.ground_truth) + [tok.eos_token_id]
            nll -= float(_teacher_forced_logp(model, seq)[len(r.prompt_ids) - 1 :].sum())
        stored = old_logprobs(model, buffer.samples, s, tok.pad_token_id, 4, None)
        for q, got in zip(buffer.samples, stored, strict=True):
            want = _teacher_forced_logp(model, q.sequence)[torch.tensor(q.loss_mask[1:])]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert sum(p.ce_sum for p in sums) == pytest.approx(nll, rel=1e-5)


def test_old_logprobs_are_taken_under_the_training_autocast(tiny_model_dir, tiny_tokenizer):
    """The log-probs stored for num_iterations > 1 are the training pass's own, under the same bf16 autocast and
    the same chunks, so the first iteration's ratio is exactly 1."""
    tok = tiny_tokenizer
    s = _settings(tok, num_generations=2)
    model = _load(tiny_model_dir, lm_head_scale=4.0)
    samples = _training_batch(tok, s).samples
    stored = old_logprobs(model, samples, s, tok.pad_token_id, 2, torch.bfloat16)
    assert [len(v) for v in stored] == [sum(q.loss_mask[1:]) for q in samples]
    with torch.no_grad():
        for start in (0, 2):
            logp, seq = policy_logprobs(
                model, samples[start : start + 2], s, tok.pad_token_id, autocast_dtype=torch.bfloat16
            )
            for i in range(2):
                assert torch.equal(stored[start + i], logp[seq == i])
    plain = old_logprobs(model, samples, s, tok.pad_token_id, 2, None)
    assert max(float((a - b).abs().max()) for a, b in zip(stored, plain, strict=True)) > 1e-3  # bf16 shows


def test_ce_term_is_teacher_forced_nll_of_ground_truth_and_eos(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    # The sampler's temperature and truncation (each of which changes log-probs here: top-5 of 384 tokens, min_p
    # 0.9 of the top probability) shape the policy loss only; CE is the model's own untempered NLL.
    sampling = Sampling(0.7, top_p=0.6, top_k=5, min_p=0.9, stop_token_ids=(tok.eos_token_id,))
    s = _settings(tok, num_generations=2, loss_type="dapo", rl_coef=0.0, ce_coef=0.5, sampling=sampling)
    model = _load(tiny_model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    buffer = _training_batch(tok, s)
    gts = [list(r.prompt_ids) + _ids(tok, r.ground_truth) + [tok.eos_token_id] for r in buffer.rows]
    ce_tokens = sum(len(_ids(tok, r.ground_truth)) + 1 for r in buffer.rows)  # ground truth + EOS
    sums = _run_step(model, buffer, s, tok, [[0, 1], [2, 3]], ce_tokens=ce_tokens)
    got = _flat_grad(params)
    nll = 0.0
    for r, seq in zip(buffer.rows, gts, strict=True):
        nll = nll - _teacher_forced_logp(model, seq)[len(r.prompt_ids) - 1 :].sum()
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(0.5 * nll / ce_tokens, params)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert sum(p.ce_sum for p in sums) == pytest.approx(float(nll.detach()), rel=1e-5)


def _labelled_runs(seq: list[int], mask: list[bool]) -> list[list[int]]:
    """The maximal runs of consecutive loss tokens of a sequence."""
    runs: list[list[int]] = []
    previous = False
    for t, m in zip(seq, mask, strict=True):
        if m and not previous:
            runs.append([])
        if m:
            runs[-1].append(t)
        previous = m
    return runs


def test_ce_sequences_of_a_multi_turn_row_label_every_assistant_turn(tiny_tokenizer):
    """The CE reference of a multi-turn row is the whole ground-truth conversation as the chat template renders
    it (with the configured chat_template_kwargs), with loss tokens on exactly the assistant contents and the
    stop token that ends each of them (the end of every turn is trained)."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% if house_style is defined %}[{{ house_style }}]{% endif %}" + tiny_tokenizer.chat_template
    s = _settings(tok, chat_template_kwargs={"house_style": "terse"})
    prompt = [_user("first question")]
    later = [_user("second question"), _assistant("second answer")]
    row = _row(tok, prompt, "first answer", later)
    (ref,) = ce_sequences([row], tok, s)
    conversation = [*prompt, _assistant("first answer"), *later]
    rendered = tok.apply_chat_template(conversation, tokenize=False, house_style="terse")
    assert rendered.startswith("[terse]<|user|>")  # the kwarg reaches the template
    assert ref.sequence == _ids(tok, rendered)
    # The prompt is the rendered first user turn with its generation prompt, exactly as the policy sees it.
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, house_style="terse")
    prompt_ids = _ids(tok, prompt_text)
    assert ref.prompt_length == len(prompt_ids) and ref.sequence[: ref.prompt_length] == prompt_ids
    assert not any(ref.loss_mask[: ref.prompt_length])
    assert [tok.decode(r) for r in _labelled_runs(ref.sequence, ref.loss_mask)] == [
        "first answer</s>",
        "second answer</s>",
    ]
    assert (ref.feature_length, ref.finished, ref.text) == (len(ref.sequence), True, "")


def test_ce_sequences_of_a_single_turn_row_append_eos_only_when_there_is_one(tiny_tokenizer):
    """Single-turn: prompt + ground truth + EOS, loss on the ground truth and EOS; no EOS token, no EOS."""
    no_eos = copy.deepcopy(tiny_tokenizer)
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None
    for tok in (tiny_tokenizer, no_eos):
        row = _row(tok, [_user("question")], "the answer")
        (ref,) = ce_sequences([row], tok, _settings(tok))
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        target = _ids(tok, "the answer") + eos
        assert ref.sequence == list(row.prompt_ids) + target
        assert ref.loss_mask == [False] * len(row.prompt_ids) + [True] * len(target)
        assert ref.prompt_length == len(row.prompt_ids)


# ---------------------------------------------------------------------------------------------
# 4. Log-probs under the sampler's distribution


def _oracle_truncated_dist(z: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """[V] log-probs of top-k, then top-p, then min-p of softmax(z), each cut renormalised, computed on the
    sorted distribution (float64); -inf outside the kept set."""
    order = torch.argsort(z.double(), descending=True)
    zs = z.double()[order]
    keep = torch.ones_like(zs, dtype=torch.bool)
    if top_k > 0:
        keep[top_k:] = False  # the k largest
    if top_p < 1.0:
        p = torch.softmax(zs.masked_fill(~keep, -math.inf), -1)
        before = torch.cumsum(p, 0) - p  # mass of the more likely kept tokens
        keep &= before < top_p  # smallest prefix reaching top_p (the crossing token stays)
    if min_p > 0.0:
        p = torch.softmax(zs.masked_fill(~keep, -math.inf), -1)
        keep &= p >= min_p * p.max()
    logp = torch.full_like(zs, -math.inf)
    logp[order[keep]] = torch.log_softmax(zs[keep], -1)
    return logp


def _oracle_truncated_logp(z: torch.Tensor, target: int, top_k: int, top_p: float, min_p: float):
    """log-prob of ``target`` and entropy of the truncated distribution (``_oracle_truncated_dist``)."""
    logp = _oracle_truncated_dist(z, top_k, top_p, min_p)
    assert torch.isfinite(logp[target]), "the sampled token lies outside the truncated set"
    kept = torch.isfinite(logp)
    entropy = -(logp[kept].exp() * logp[kept]).sum()
    return logp[target], entropy


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [
        (1.0, 0, 1.0, 0.0),
        (0.7, 0, 1.0, 0.0),
        (1.0, 5, 1.0, 0.0),
        (0.8, 0, 0.8, 0.0),
        (1.0, 0, 1.0, 0.1),
        (0.9, 8, 0.9, 0.05),
    ],
)
def test_policy_logprobs_match_per_sequence_oracle(tiny_model_dir, tiny_tokenizer, temperature, top_k, top_p, min_p):
    tok = tiny_tokenizer
    sampling = Sampling(temperature, top_p, top_k, min_p, stop_token_ids=(tok.eos_token_id,))
    s = _settings(tok, sampling=sampling)
    model = _load(tiny_model_dir, lm_head_scale=6.0)
    prompts = [_ids(tok, "import os"), _ids(tok, "class Widget(object):\n    def __init__(self):")]
    # Completions drawn by HF generate with these very settings, so every target is in the sampler's set.
    drawn = HFGenerate(model, sampling=sampling, pad_token_id=tok.pad_token_id).generate(prompts, 2, [5, 12], [1, 2])
    samples = []
    for prompt, group in zip(prompts, drawn, strict=True):
        for c in group:
            samples.append(
                Sample(
                    prompt + list(c.ids), len(prompt), [False] * len(prompt) + [True] * len(c.ids), 0, c.finished, ""
                )
            )
    lengths = [len(q.sequence) for q in samples]
    assert len(set(lengths)) > 1  # right padding is exercised
    with torch.no_grad():
        logp, seq, entropy = policy_logprobs(model, samples, s, tok.pad_token_id, with_entropy=True)
        alone = [policy_logprobs(model, [q], s, tok.pad_token_id)[0] for q in samples]
        want_logp, want_entropy, want_seq = [], [], []
        for i, q in enumerate(samples):
            ids = torch.tensor([q.sequence])
            logits = model(ids).logits[0].float() / temperature
            for t in range(1, len(q.sequence)):
                if q.loss_mask[t]:
                    lp, ent = _oracle_truncated_logp(logits[t - 1], q.sequence[t], top_k, top_p, min_p)
                    want_logp.append(lp)
                    want_entropy.append(ent)
                    want_seq.append(i)
    assert seq.tolist() == want_seq
    torch.testing.assert_close(logp.double(), torch.stack(want_logp), atol=2e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), torch.stack(want_entropy), atol=2e-5, rtol=0)
    # Each sequence alone (no padding at all) gives the same values as inside the padded batch.
    torch.testing.assert_close(torch.cat(alone), logp, atol=1e-5, rtol=0)


def test_truncation_keep_order_hand_example():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # top-p 0.75 alone: mass before each token 0, 0.4, 0.7, 0.9 -> keeps tokens 0, 1, 2
    assert truncation_keep(logits, top_p=0.75).tolist() == [True, True, True, False]
    # top-k 3 first renormalises to 4/9, 3/9, 2/9; top-p 0.75 then sees mass before 0, 0.444, 0.778 -> 0, 1
    assert truncation_keep(logits, top_p=0.75, top_k=3).tolist() == [True, True, False, False]
    # min-p 0.6 after top-k 3: threshold 0.6 * 4/9 = 0.267; 3/9 = 0.333 stays, 2/9 = 0.222 goes
    assert truncation_keep(logits, top_k=3, min_p=0.6).tolist() == [True, True, False, False]
    # top-p 0.95 keeps all four (0.9 < 0.95); min-p 0.3 then drops 0.1 < 0.3 * 0.4 = 0.12
    assert truncation_keep(logits, top_p=0.95, min_p=0.3).tolist() == [True, True, True, False]
    # top-k 1 keeps the argmax only, whatever top-p says
    assert truncation_keep(logits, top_p=0.99, top_k=1).tolist() == [True, False, False, False]


def test_truncation_keep_matches_transformers_warpers():
    """Independent implementation: transformers' own logits warpers, in generate's order."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen) * 2.5
    for top_k, top_p, min_p in [(10, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2), (12, 0.8, 0.05), (20, 0.5, 0.3)]:
        scores = logits.clone()
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
        if min_p:
            scores = MinPLogitsWarper(min_p)(None, scores)
        assert torch.equal(truncation_keep(logits, top_p=top_p, top_k=top_k, min_p=min_p), scores > -math.inf)


# ---------------------------------------------------------------------------------------------
# 5. Multi-turn rollouts: every sample keeps its own conversation


def _chat_text(messages, generation_prompt=False):
    """The tiny model's chat template written out: ``<|role|>\\ncontent</s>\\n`` per message."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages)
    return text + ("<|assistant|>\n" if generation_prompt else "")


def _multi_turn_rows(tok):
    return [
        # three assistant turns
        _row(
            tok,
            [_user("alpha one")],
            "gt a1",
            [_user("alpha two"), _assistant("gt a2"), _user("alpha three is longer"), _assistant("gt a3")],
        ),
        # a system message, two assistant turns, and a trailing user message nobody answers
        _row(
            tok,
            [{"role": "system", "content": "be brief"}, _user("bravo one")],
            "gt b1",
            [_user("bravo two"), _assistant("gt b2"), _user("bravo left hanging")],
        ),
        # single-turn row in the same batch
        _row(tok, [_user("charlie")], "gt c1"),
    ]


def _expected_conversation(row, tag, j):
    """Messages of sample j of a row: its own user turns, and its own replies in place of the ground truth."""
    turn = 0
    out = [*row.prompt, _assistant(f"re {tag} s{j} t0")]
    for m in row.remaining_turns:
        if m["role"] == "assistant":
            turn += 1
            out.append(_assistant(f"re {tag} s{j} t{turn}"))
        else:
            out.append(dict(m))
    return out


def _expected_tokens(tok, row, conversation):
    """ids and loss mask of a conversation: True exactly on the tokens of the assistant replies after the prompt."""
    text, spans = "", []
    for k, m in enumerate(conversation):
        header = f"<|{m['role']}|>\n"
        if k >= len(row.prompt) and m["role"] == "assistant":
            spans.append((len(text) + len(header), len(text) + len(header) + len(m["content"])))
        text += header + m["content"] + "</s>\n"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [e > s and any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
    return text, enc["input_ids"], mask


def test_multi_turn_samples_keep_their_own_conversation(tiny_tokenizer):
    tok = tiny_tokenizer
    G = 2
    s = _settings(tok, num_generations=G)
    rows = _multi_turn_rows(tok)
    tags = ["alpha", "bravo", "charlie"]
    seeds = [11, 22, 33]
    backend = FakeBackend(tok)
    samples = roll_out(backend, rows, s, tok, seeds)
    assert len(samples) == len(rows) * G

    for p, (row, tag) in enumerate(zip(rows, tags, strict=True)):
        for j in range(G):
            q = samples[p * G + j]
            if not row.remaining_turns:  # single-turn: prompt + reply + EOS, loss on reply and EOS
                reply = _ids(tok, f"re {tag} s{j} t0") + [tok.eos_token_id]
                assert q.sequence == list(row.prompt_ids) + reply
                assert q.loss_mask == [False] * len(row.prompt_ids) + [True] * len(reply)
                assert q.feature_length == len(q.sequence) - 1
                continue
            conversation = _expected_conversation(row, tag, j)
            text, ids, mask = _expected_tokens(tok, row, conversation)
            assert tok.decode(q.sequence, skip_special_tokens=False) == text
            assert q.sequence == ids
            assert q.loss_mask == mask
            replies = [m["content"] for m in conversation[len(row.prompt) :] if m["role"] == "assistant"]
            assert tok.decode([t for t, m in zip(q.sequence, q.loss_mask, strict=True) if m]) == "".join(replies)
            assert q.prompt_length == len(row.prompt_ids)
            assert q.sequence[: q.prompt_length] == list(row.prompt_ids)
            assert q.feature_length == len(q.sequence) and q.finished

    # The backend saw: one first-turn call for all rows, then one call per later round, each context the
    # sample's own conversation up to the turn it answers.
    first, *later = backend.calls
    assert first["prompts"] == [list(r.prompt_ids) for r in rows] and first["n"] == G and first["seeds"] == seeds
    assert [c["n"] for c in later] == [1, 1]
    # Round 1: samples of alpha (turn 1) and bravo (turn 1); round 2: alpha's samples only (turn 2).
    contexts = [tok.decode(ids, skip_special_tokens=False) for c in later for ids in c["prompts"]]
    expected = []
    for turn, waiting in ((1, [0, 1]), (2, [0])):
        for p in waiting:
            for j in range(G):
                conversation = _expected_conversation(rows[p], tags[p], j)
                # everything before the turn-th reply of this sample, then the generation prompt
                upto = [k for k, m in enumerate(conversation) if m["role"] == "assistant"][turn]
                expected.append(_chat_text(conversation[:upto], generation_prompt=True))
    assert contexts == expected

    # Seeds: one per (prompt, sample, turn), all distinct, none equal to a first-turn seed.
    later_seeds = [seed for c in later for seed in c["seeds"]]
    assert len(set(later_seeds)) == len(later_seeds) == 6
    assert not set(later_seeds) & set(seeds)

    # A row's rollouts depend on its own seed only: bravo alone (same seed) gets the same contexts,
    # seeds and samples as inside the batch.
    alone = FakeBackend(tok)
    solo = roll_out(alone, [rows[1]], s, tok, [22])
    assert solo == samples[G : 2 * G]
    assert alone.calls[1]["seeds"] == later[0]["seeds"][G : 2 * G]
    assert alone.calls[1]["prompts"] == later[0]["prompts"][G : 2 * G]


def test_multi_turn_generates_nothing_past_sequence_len(tiny_tokenizer):
    """A sample is cut at sequence_len; a later turn must not ask for tokens beyond it (they would be thrown
    away, and a vLLM server with max_model_len = sequence_len rejects such a request)."""
    tok = tiny_tokenizer
    seq_len = 64
    s = _settings(tok, num_generations=2, sequence_len=seq_len, max_completion_length=16)
    rows = [
        # the second user turn alone is ~60 tokens: the reply after it has no room at all
        _row(
            tok,
            [_user("alpha go")],
            "gt",
            [_user("alpha " + "self " * 60), _assistant("x"), _user("more"), _assistant("y")],
        ),
        # the second context (about 30 tokens) leaves room for fewer than 16 new tokens
        _row(tok, [_user("bravo go")], "gt", [_user("bravo " + "self " * 18), _assistant("x")]),
        # fits: untouched
        _row(tok, [_user("charlie go")], "gt", [_user("charlie two"), _assistant("y")]),
    ]
    backend = FakeBackend(tok)
    samples = roll_out(backend, rows, s, tok, [1, 2, 3])
    for call in backend.calls:
        for prompt, cap in zip(call["prompts"], call["max_tokens"], strict=True):
            assert len(prompt) + cap <= seq_len
    assert all(len(q.sequence) <= seq_len for q in samples)
    # alpha's second reply would start past the end: nothing is generated for it, and the sample is truncated
    alpha = [tok.decode(p, skip_special_tokens=False) for c in backend.calls[1:] for p in c["prompts"]]
    assert not any(text.startswith("<|user|>\nalpha") for text in alpha)
    assert [q.finished for q in samples[:2]] == [False, False]
    # bravo's reply is capped at the room left ("re bravo s0 t1" + EOS fits in it, so it still finishes)
    bravo_caps = [
        cap
        for c in backend.calls[1:]
        for p, cap in zip(c["prompts"], c["max_tokens"], strict=True)
        if tok.decode(p).startswith("<|user|>\nbravo")
    ]
    assert len(bravo_caps) == 2 and all(cap < 16 for cap in bravo_caps)
    # charlie fits: the same as with an unlimited sequence_len
    wide = roll_out(FakeBackend(tok), rows[2:], replace(s, sequence_len=SEQ_LEN), tok, [3])
    assert samples[4:] == wide and all(q.finished for q in wide)


@pytest.mark.parametrize("reply", ["s", "assistant", "\n", "|>", "a plain reply"])
def test_multi_turn_mask_of_a_reply_that_also_occurs_in_the_markup(tiny_tokenizer, reply):
    """A later reply is looked for after its own header: "s" must not match the "s" of the previous
    message's "</s>", nor "assistant" the header's special token, nor "\n" the newline after "</s>"."""
    from ebft.structured.chat import conversation_tokens

    tok = tiny_tokenizer
    row = _row(tok, [_user("hi there")], "gt")
    conversation = [*row.prompt, _assistant("first answer"), _user("more please"), _assistant(reply)]
    tokens = conversation_tokens(tok, conversation, 1, [True, False, True])
    text, ids, mask = _expected_tokens(tok, row, conversation)
    assert tokens.ids == ids
    assert tokens.generated_mask == mask
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == "first answer" + reply


def test_multi_turn_truncated_turn_masks_the_whole_conversation(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = _multi_turn_rows(tok)[:2]
    # Sample 1 of alpha runs out of tokens at its second reply; everything else finishes.
    backend = FakeBackend(tok, unfinished={("alpha", 1, 1)})
    masked = roll_out(backend, rows, _settings(tok, num_generations=2, mask_truncated_completions=True), tok, [1, 2])
    assert [q.finished for q in masked] == [True, False, True, True]
    assert not any(masked[1].loss_mask)
    assert all(any(q.loss_mask) for i, q in enumerate(masked) if i != 1)
    kept = roll_out(
        FakeBackend(tok, unfinished={("alpha", 1, 1)}), rows, _settings(tok, num_generations=2), tok, [1, 2]
    )
    assert kept[1].loss_mask == _expected_tokens(tok, rows[0], _expected_conversation(rows[0], "alpha", 1))[2]


# ---------------------------------------------------------------------------------------------
# 6. Adaptive max tokens


class _ByteReplies:
    """Replies spelled one byte-level token per character ("re" as "r", "e", ...): decoding and
    re-encoding merges them, so the re-rendered conversation holds other tokens than the sampled ones.
    Reports sampler log-probs (-0.5 per token). Records the contexts it was given."""

    def __init__(self, tok):
        self.tok, self.contexts = tok, []

    def generate(self, prompts, n, max_tokens, seeds):
        out = []
        for prompt, cap in zip(prompts, max_tokens, strict=True):
            self.contexts.append(list(prompt))
            chars = [self.tok.convert_tokens_to_ids(ch) for ch in f"reply{len(self.contexts)}"]
            ids = tuple([*chars, self.tok.eos_token_id][:cap])
            out.append([Completion(ids, finished=len(ids) == len(chars) + 1, logprobs=(-0.5,) * len(ids))] * n)
        return out


def test_multi_turn_loss_scores_the_sampled_ids_in_their_own_contexts(tiny_model_dir, tiny_tokenizer):
    """The policy gradient must score exactly what was sampled where it was sampled: each reply's ids
    after the context it was generated from, not the re-rendered, re-tokenised conversation."""
    tok = tiny_tokenizer
    s = _settings(tok, num_generations=1)
    row = _multi_turn_rows(tok)[1]  # two assistant turns
    backend = _ByteReplies(tok)
    (sample,) = roll_out(backend, [row], s, tok, [5])
    replies = [tuple(tok.convert_tokens_to_ids(ch) for ch in f"reply{k}") + (tok.eos_token_id,) for k in (1, 2)]
    # The sampled ids are not what re-encoding the text gives (the test is only meaningful if so).
    assert _ids(tok, "reply1") != list(replies[0][:-1])
    assert sample.turns == tuple(zip((tuple(c) for c in backend.contexts), replies, strict=True))
    assert sample.behaviour_logprobs == [-0.5] * sum(len(r) for r in replies)
    assert loss_token_count(sample) == sum(len(r) for r in replies)
    model = _load(tiny_model_dir)
    with torch.no_grad():
        logp, seq = policy_logprobs(model, [sample], s, tok.pad_token_id)
        want = torch.cat([_teacher_forced_logp(model, list(ctx) + list(r))[len(ctx) - 1 :] for ctx, r in sample.turns])
    assert (seq == 0).all()
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=1e-5)


def test_loss_token_count_is_the_number_of_log_probs_the_loss_reads(tiny_model_dir, tiny_tokenizer):
    """The step's token denominators (dapo, is_tokens, skipping) count what ``policy_logprobs`` scores."""
    tok = tiny_tokenizer
    s = _settings(tok, num_generations=1)

    def single(seq, mask):
        return Sample(seq, 1, mask, len(seq), True, "")

    samples = [
        # A one-token prompt: both completion tokens are predicted (at positions 0 and 1): 2.
        single([7, 8, 9], [False, True, True]),
        # A view's first token has no position before it, so it cannot be a target: 1 of 2.
        single([7, 8, 9], [True, True, False]),
        # Multi-turn, one view per reply: (ctx 7 | reply 8, 9) gives 2, (ctx 7, 8, 9, 10 | reply 11) gives 1: 3.
        replace(single([7, 8, 9, 10, 11], [False] * 5), turns=(((7,), (8, 9)), ((7, 8, 9, 10), (11,)))),
        # The same conversation excluded from the loss: 0.
        replace(single([7, 8, 9, 10, 11], [False] * 5), turns=(((7,), (8, 9)), ((7, 8, 9, 10), (11,))), trained=False),
    ]
    assert [loss_token_count(q) for q in samples] == [2, 1, 3, 0]
    with torch.no_grad():
        _, seq = policy_logprobs(_load(tiny_model_dir), samples, s, tok.pad_token_id)
    assert torch.bincount(seq, minlength=len(samples)).tolist() == [2, 1, 3, 0]


def test_completion_cap_hand_cases(tiny_tokenizer):
    s = _settings(tiny_tokenizer, max_completion_length=100, adaptive_max_tokens=True, gt_length_multiplier=1.5)
    assert ADAPTIVE_FLOOR == 64
    assert completion_cap(10, s) == 64  # ceil(1.5 * 10) = 15 < floor 64
    assert completion_cap(43, s) == 65  # ceil(1.5 * 43) = ceil(64.5) = 65
    assert completion_cap(50, s) == 75  # 1.5 * 50 = 75
    assert completion_cap(80, s) == 100  # 120 > max_completion_length 100
    assert completion_cap(10, replace(s, gt_length_multiplier=8.0)) == 80  # 8 * 10 = 80
    assert completion_cap(10, replace(s, max_completion_length=32)) == 32  # floor 64 but only 32 allowed
    assert completion_cap(10, replace(s, adaptive_max_tokens=False)) == 100  # off: always the maximum
    assert completion_cap(500, replace(s, adaptive_max_tokens=False)) == 100


def test_roll_out_passes_each_prompt_its_own_cap(tiny_tokenizer):
    tok = tiny_tokenizer
    s = _settings(tok, num_generations=2, max_completion_length=100, adaptive_max_tokens=True, gt_length_multiplier=1.5)
    short, middle, long = "ok", " ".join(["self"] * 50), " ".join(["self"] * 90)
    n_short, n_middle, n_long = (len(_ids(tok, t)) for t in (short, middle, long))
    assert n_short < 43 and 43 < n_middle < 66 and n_long > 67  # caps: floor, in between, maximum
    rows = [
        _row(tok, [_user("alpha")], short),
        _row(tok, [_user("bravo")], middle),
        _row(tok, [_user("charlie")], long, [_user("charlie again"), _assistant(middle)]),
    ]
    backend = FakeBackend(tok)
    roll_out(backend, rows, s, tok, [1, 2, 3])
    first, second = backend.calls
    assert first["max_tokens"] == [64, math.ceil(1.5 * n_middle), 100]
    # The multi-turn row's second reply is capped by the length of the ground-truth reply it replaces.
    assert second["max_tokens"] == [math.ceil(1.5 * n_middle)] * 2
    off = FakeBackend(tok)
    roll_out(off, rows, replace(s, adaptive_max_tokens=False), tok, [1, 2, 3])
    assert off.calls[0]["max_tokens"] == [100, 100, 100] and off.calls[1]["max_tokens"] == [100, 100]


def test_cut_completion_cases():
    stops = (2, 3)
    tokens = [5, 7, 2, 9, 3]
    assert cut_completion(tokens, stops, 5) == Completion((5, 7, 2), True)  # stop inside the cap, kept
    assert cut_completion(tokens, stops, 3) == Completion((5, 7, 2), True)  # stop exactly at the cap
    assert cut_completion(tokens, stops, 2) == Completion((5, 7), False)  # stop after the cap
    assert cut_completion([5, 7, 9], stops, 10) == Completion((5, 7, 9), False)  # no stop at all
    assert cut_completion([5, 3, 0, 0], stops, 4) == Completion((5, 3), True)  # padding after the stop
    assert cut_completion([3], stops, 1) == Completion((3,), True)  # an empty answer still finishes


# ---------------------------------------------------------------------------------------------
# 7. Truncated completions, stop tokens


def test_mask_truncated_completions_and_stop_token(tiny_tokenizer):
    tok = tiny_tokenizer
    row = _row(tok, [_user("question")], "answer")
    P = len(row.prompt_ids)
    reply = _ids(tok, "some reply")
    done = Completion(tuple(reply + [tok.eos_token_id]), finished=True)
    cut = Completion(tuple(reply), finished=False)
    for mask_truncated in (False, True):
        s = _settings(tok, mask_truncated_completions=mask_truncated)
        finished, truncated = _single_turn(row, done, s, tok), _single_turn(row, cut, s, tok)
        # Finished: the stop token is in the sequence and the loss, not in the features.
        assert finished.sequence == list(row.prompt_ids) + reply + [tok.eos_token_id]
        assert finished.loss_mask == [False] * P + [True] * (len(reply) + 1)
        assert finished.feature_length == P + len(reply)
        assert finished.text == "some reply"
        # Truncated: no stop token; the loss is masked only when asked.
        assert truncated.sequence == list(row.prompt_ids) + reply and truncated.feature_length == P + len(reply)
        assert truncated.loss_mask == [False] * P + [not mask_truncated] * len(reply)
        assert truncated.finished is False


def test_sampler_logprobs_weigh_nothing_without_the_correction(tiny_model_dir, tiny_tokenizer):
    """Rollouts that carry the sampler's log-probs (vLLM) are not reweighted when the importance-sampling
    correction is off: the gradient is the plain on-policy one and no importance metrics are reported."""
    tok = tiny_tokenizer
    s = _settings(tok, num_generations=2, loss_type="dapo", is_correction=False)
    model = _load(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    row = _row(tok, [_user("question")], "answer")
    ids = tuple(_ids(tok, "a reply") + [tok.eos_token_id])
    with torch.no_grad():
        current = _teacher_forced_logp(model, list(row.prompt_ids) + list(ids))[len(row.prompt_ids) - 1 :]
    # With the correction on these would weigh exp(log 2) = 2 per token.
    sample = _single_turn(row, Completion(ids, True, tuple((current - math.log(2.0)).tolist())), s, tok)
    other = _single_turn(row, Completion(ids, True), s, tok)
    zeros = torch.zeros(1, 2)
    advantage = torch.tensor([1.0, -0.5])
    buffer = RolloutBuffer([row], [sample, other], Scores(zeros, zeros, zeros, zeros, zeros[:, 0]), advantage, 0)
    (sums,) = _run_step(model, buffer, s, tok, [[0, 1]])
    assert (sums.is_tokens, sums.is_ratio_sum, sums.is_ratio_min) == (0, 0, math.inf)
    logp = _teacher_forced_logp(model, sample.sequence)[len(row.prompt_ids) - 1 :]
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-(1.0 - 0.5) * logp.sum() / (2 * len(ids)), params)])
    torch.testing.assert_close(_flat_grad(params), want, atol=1e-6, rtol=1e-4)


def test_importance_weights_with_masked_truncated_completions(tiny_model_dir, tiny_tokenizer):
    """vLLM rollouts carry the sampler's log-probs; a micro-batch that also holds a masked (truncated)
    completion must still weight its finished completions' tokens by pi_old / pi_sampler."""
    tok = tiny_tokenizer
    s = _settings(
        tok,
        num_generations=2,
        loss_type="dapo",
        mask_truncated_completions=True,
        is_correction=True,
        is_bounds=(1 / 3.0, 3.0),
    )
    model = _load(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    row = _row(tok, [_user("question")], "answer")
    done_ids = tuple(_ids(tok, "a finished reply") + [tok.eos_token_id])
    with torch.no_grad():
        current = _teacher_forced_logp(model, list(row.prompt_ids) + list(done_ids))[len(row.prompt_ids) - 1 :]
    # The sampler's log-probs are log 2 below the policy's: importance weight exp(log 2) = 2 on every token.
    done = Completion(done_ids, True, tuple((current - math.log(2.0)).tolist()))
    cut_ids = tuple(_ids(tok, "cut off"))
    cut = Completion(cut_ids, False, tuple([-1.0] * len(cut_ids)))
    samples = [_single_turn(row, c, s, tok) for c in (done, cut)]
    advantage = torch.tensor([1.0, -1.0])
    zeros = torch.zeros(1, 2)
    buffer = RolloutBuffer([row], samples, Scores(zeros, zeros, zeros, zeros, zeros[:, 0]), advantage, 0)
    (sums,) = _run_step(model, buffer, s, tok, [[0, 1]])
    got = _flat_grad(params)
    assert sums.is_tokens == len(done_ids)
    assert sums.is_ratio_sum == pytest.approx(2.0 * len(done_ids), rel=1e-4)
    logp = _teacher_forced_logp(model, samples[0].sequence)[len(row.prompt_ids) - 1 :]
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-2.0 * logp.sum() / len(done_ids), params)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_importance_weights_only_where_the_sampler_reported_log_probs(tiny_model_dir, tiny_tokenizer):
    """A sample without sampler log-probs (a re-tokenised multi-turn reply) keeps weight 1, while the
    others in its micro-batch are still weighted by pi_old / pi_sampler."""
    tok = tiny_tokenizer
    s = _settings(tok, num_generations=2, loss_type="dapo", is_correction=True, is_bounds=(1 / 3.0, 3.0))
    model = _load(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    row = _row(tok, [_user("question")], "answer")
    a_ids = tuple(_ids(tok, "first reply") + [tok.eos_token_id])
    b_ids = tuple(_ids(tok, "second") + [tok.eos_token_id])
    with torch.no_grad():
        current = _teacher_forced_logp(model, list(row.prompt_ids) + list(a_ids))[len(row.prompt_ids) - 1 :]
    # Sample a: the sampler's log-probs are log 4 below the policy's, so w = min(4, cap 3) = 3 per token.
    # Sample b: no log-probs reported, so w = 1.
    a = Completion(a_ids, True, tuple((current - math.log(4.0)).tolist()))
    b = Completion(b_ids, True)
    samples = [_single_turn(row, c, s, tok) for c in (a, b)]
    advantage = torch.tensor([1.0, -1.0])
    zeros = torch.zeros(1, 2)
    buffer = RolloutBuffer([row], samples, Scores(zeros, zeros, zeros, zeros, zeros[:, 0]), advantage, 0)
    (sums,) = _run_step(model, buffer, s, tok, [[0, 1]])
    got = _flat_grad(params)
    assert sums.is_tokens == len(a_ids)  # only the reported tokens enter the IS metrics
    assert sums.is_ratio_sum == pytest.approx(4.0 * len(a_ids), rel=1e-4)  # raw ratio 4 before the clamp
    tokens = len(a_ids) + len(b_ids)  # dapo: mean over every loss token of the step
    logp_a = _teacher_forced_logp(model, samples[0].sequence)[len(row.prompt_ids) - 1 :]
    logp_b = _teacher_forced_logp(model, samples[1].sequence)[len(row.prompt_ids) - 1 :]
    loss = (-3.0 * 1.0 * logp_a.sum() - 1.0 * (-1.0) * logp_b.sum()) / tokens
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_importance_weights_are_clamped_to_the_trl_clip_bounds(tiny_model_dir, tiny_tokenizer):
    """trl.vllm_importance_sampling_clip_min / _max (axolotl 0.19's names) set both ends of the clamp."""
    tok = tiny_tokenizer
    trl = TrlSection(vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.5)
    s = _settings(tok, num_generations=2, loss_type="dapo", is_correction=True, is_bounds=trl.importance_weight_bounds)
    model = _load(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    row = _row(tok, [_user("question")], "answer")
    a_ids = tuple(_ids(tok, "first reply") + [tok.eos_token_id])
    b_ids = tuple(_ids(tok, "second") + [tok.eos_token_id])
    with torch.no_grad():
        logp_a_now = _teacher_forced_logp(model, list(row.prompt_ids) + list(a_ids))[len(row.prompt_ids) - 1 :]
        logp_b_now = _teacher_forced_logp(model, list(row.prompt_ids) + list(b_ids))[len(row.prompt_ids) - 1 :]
    # a: sampler log-probs log 4 below the policy's, raw w = 4, clamped to clip_max 2.5 (the cap 3 is not read).
    # b: sampler log-probs log 4 above, raw w = 1/4, clamped to clip_min 0.5 (not 1/cap or 1/clip_max = 0.4).
    a = Completion(a_ids, True, tuple((logp_a_now - math.log(4.0)).tolist()))
    b = Completion(b_ids, True, tuple((logp_b_now + math.log(4.0)).tolist()))
    samples = [_single_turn(row, c, s, tok) for c in (a, b)]
    advantage = torch.tensor([1.0, -1.0])
    zeros = torch.zeros(1, 2)
    buffer = RolloutBuffer([row], samples, Scores(zeros, zeros, zeros, zeros, zeros[:, 0]), advantage, 0)
    (sums,) = _run_step(model, buffer, s, tok, [[0, 1]])
    got = _flat_grad(params)
    # Raw ratios before the clamp: 4 per token of a, 1/4 per token of b.
    assert sums.is_ratio_sum == pytest.approx(4.0 * len(a_ids) + 0.25 * len(b_ids), rel=1e-4)
    tokens = len(a_ids) + len(b_ids)  # dapo: mean over every loss token of the step
    logp_a = _teacher_forced_logp(model, samples[0].sequence)[len(row.prompt_ids) - 1 :]
    logp_b = _teacher_forced_logp(model, samples[1].sequence)[len(row.prompt_ids) - 1 :]
    loss = (-2.5 * 1.0 * logp_a.sum() - 0.5 * (-1.0) * logp_b.sum()) / tokens
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_importance_weights_are_clamped_to_one_over_cap_from_below(tiny_model_dir, tiny_tokenizer):
    """The weight pi_old / pi_sampler is clamped to [1/cap, cap]: a token the sampler found far likelier than
    the policy does (raw ratio 1/4) weighs 1/3 with cap 3, one it found far less likely (raw 4) weighs 3."""
    tok = tiny_tokenizer
    s = _settings(
        tok,
        num_generations=2,
        loss_type="dapo",
        is_correction=True,
        is_bounds=TrlSection(vllm_importance_sampling_cap=3.0).importance_weight_bounds,
    )
    model = _load(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    row = _row(tok, [_user("question")], "answer")
    a_ids = tuple(_ids(tok, "first reply") + [tok.eos_token_id])
    b_ids = tuple(_ids(tok, "second") + [tok.eos_token_id])
    with torch.no_grad():
        current = [
            _teacher_forced_logp(model, list(row.prompt_ids) + list(ids))[len(row.prompt_ids) - 1 :]
            for ids in (a_ids, b_ids)
        ]
    # Sample a: sampler log-probs log 4 above the policy's -> raw ratio 1/4 -> w = max(1/4, 1/3) = 1/3.
    # Sample b: sampler log-probs log 4 below the policy's -> raw ratio 4 -> w = min(4, 3) = 3.
    a = Completion(a_ids, True, tuple((current[0] + math.log(4.0)).tolist()))
    b = Completion(b_ids, True, tuple((current[1] - math.log(4.0)).tolist()))
    samples = [_single_turn(row, c, s, tok) for c in (a, b)]
    advantage = torch.tensor([1.0, -1.0])
    zeros = torch.zeros(1, 2)
    buffer = RolloutBuffer([row], samples, Scores(zeros, zeros, zeros, zeros, zeros[:, 0]), advantage, 0)
    (sums,) = _run_step(model, buffer, s, tok, [[0, 1]])
    got = _flat_grad(params)
    tokens = len(a_ids) + len(b_ids)
    assert sums.is_tokens == tokens
    assert sums.is_ratio_min == pytest.approx(0.25, rel=1e-4)  # the raw ratio, before the clamp
    assert sums.is_ratio_sum == pytest.approx(0.25 * len(a_ids) + 4.0 * len(b_ids), rel=1e-4)
    logp_a = _teacher_forced_logp(model, samples[0].sequence)[len(row.prompt_ids) - 1 :]
    logp_b = _teacher_forced_logp(model, samples[1].sequence)[len(row.prompt_ids) - 1 :]
    # dapo on-policy: -(w * A * logp) summed over the step's tokens / its token count.
    loss = (-(1.0 / 3.0) * 1.0 * logp_a.sum() - 3.0 * (-1.0) * logp_b.sum()) / tokens
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# 8. HFGenerate


def test_hf_generate_seeds_and_prompt_independence(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    model = _load(tiny_model_dir, lm_head_scale=3.0)
    backend = HFGenerate(
        model, sampling=Sampling(1.0, 0.95, 40, stop_token_ids=(tok.eos_token_id,)), pad_token_id=tok.pad_token_id
    )
    prompts = [_ids(tok, "import sys"), _ids(tok, "def main(argv):\n    return"), _ids(tok, "x = 1")]
    model.train()  # as in training; generate switches to eval and back
    alone = backend.generate([prompts[1]], 3, [10], [7])
    again = backend.generate([prompts[1]], 3, [10], [7])
    assert alone == again  # same seed, same completions
    assert len({c.ids for c in alone[0]}) > 1  # the n samples of one prompt differ
    batch = backend.generate(prompts, 3, [6, 10, 4], [5, 7, 9])
    assert batch[1] == alone[0]  # other prompts (and their caps) in the call change nothing
    assert backend.generate([prompts[1]], 3, [10], [8]) != alone  # another seed, other completions
    assert model.training  # generate restores the mode it found


def test_hf_generate_cuts_each_prompt_at_its_own_cap(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    model = _load(tiny_model_dir, lm_head_scale=3.0)
    prompts = [_ids(tok, "import sys"), _ids(tok, "for i in")]
    free = HFGenerate(model, sampling=Sampling(1.0), pad_token_id=tok.pad_token_id)
    long = free.generate(prompts, 4, [12, 12], [3, 4])
    # Make some completions stop: the 3rd token of prompt 0's first sample becomes a stop token.
    stop = long[0][0].ids[2]
    backend = HFGenerate(model, sampling=Sampling(1.0, stop_token_ids=(stop,)), pad_token_id=tok.pad_token_id)
    full = backend.generate(prompts, 4, [12, 12], [3, 4])
    capped = backend.generate(prompts, 4, [3, 8], [3, 4])
    for i, cap in enumerate((3, 8)):
        for c_full, c in zip(full[i], capped[i], strict=True):
            # Same seed: the capped completion is the 12-token one cut at this prompt's cap.
            assert c == cut_completion(list(c_full.ids), (stop,), cap)
            assert len(c.ids) <= cap and (c.finished or len(c.ids) == cap)
    assert capped[0][0] == Completion(long[0][0].ids[:3], True)
    assert any(not c.finished for group in capped for c in group)


def test_hf_generate_greedy_is_argmax_decoding(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    model = _load(tiny_model_dir, lm_head_scale=3.0)
    prompt = _ids(tok, "def main():")
    # Stop on the 4th greedy token so that the stop path is taken.
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    greedy_free = seq[len(prompt) :]
    stop = greedy_free[3]
    first_stop = greedy_free.index(stop)
    backend = HFGenerate(model, sampling=Sampling(0.0, stop_token_ids=(stop,)), pad_token_id=tok.pad_token_id)
    out = backend.generate([prompt], 2, [12], [0])
    assert out[0] == [Completion(tuple(greedy_free[: first_stop + 1]), True)] * 2
    free = HFGenerate(model, sampling=Sampling(0.0), pad_token_id=tok.pad_token_id).generate([prompt], 1, [12], [5])
    assert free[0] == [Completion(tuple(greedy_free), False)]


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 20, 0.9, 0.0), (1.0, 0, 0.6, 0.02)],
)
def test_hf_generate_samples_the_distribution_that_is_scored(
    tiny_model_dir, tiny_tokenizer, temperature, top_k, top_p, min_p
):
    """The policy gradient is on-policy only if generate draws from exactly the distribution that
    policy_logprobs scores. For first tokens x ~ q (generate), E_q[log p(x)] = -H(p) iff q = p (up to the
    KL divergence); 4000 draws put the mean within a few standard errors."""
    tok = tiny_tokenizer
    sampling = Sampling(temperature, top_p, top_k, min_p, stop_token_ids=(tok.eos_token_id,))
    model = _load(tiny_model_dir, lm_head_scale=3.0)
    prompt = _ids(tok, "def main():")
    (draws,) = HFGenerate(model, sampling=sampling, pad_token_id=tok.pad_token_id).generate([prompt], 4000, [1], [3])
    with torch.no_grad():
        z = model(torch.tensor([prompt])).logits[0, -1].float() / temperature
        logp = _oracle_truncated_dist(z, top_k, top_p, min_p)
    kept = torch.isfinite(logp)
    entropy = -(logp[kept].exp() * logp[kept]).sum()
    sampled = torch.tensor([c.ids[0] for c in draws])
    assert kept[sampled].all()  # nothing outside the truncated set
    values = logp[sampled]
    stderr = float(values.std()) / math.sqrt(len(values))
    assert abs(float(values.mean()) + float(entropy)) < 4 * stderr + 1e-3

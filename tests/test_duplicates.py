"""Identical rollouts get identical features, rewards and advantages, in every precision (docs/design.md §7.1).

Under bf16 autocast two identical rollouts at different places of a packed row (strided) or of a padded
batch (structured) get features that differ in the last bits, and whitening would blow that up into
unrelated rewards. Duplicates are found by their tokens and share one feature row.
"""

from __future__ import annotations

import pytest
import torch
from structured_builders import structured_settings

from ebft import features as feat
from ebft import rewards
from ebft.attention.strided import build_plan
from ebft.data.collate import collate_documents
from ebft.modeling.feature_network import FeatureNetwork
from ebft.strided.generate import pack
from ebft.strided.step import StridedSettings, layout_for, score_rollouts


def test_duplicate_sources_hand_example():
    # Group 0: samples 2 and 3 repeat samples 0 and 1; sample 4 is new. Group 1: all distinct except 1 == 2.
    ids = torch.tensor(
        [
            [[1, 2], [3, 4], [1, 2], [3, 4], [5, 6]],
            [[1, 2], [2, 1], [2, 1], [1, 3], [0, 0]],
        ]
    )
    assert rewards.duplicate_sources(ids).tolist() == [[0, 1, 0, 1, 4], [0, 1, 1, 3, 4]]


def test_duplicate_sources_rejects_ids_without_a_group_dim():
    with pytest.raises(ValueError, match=r"expected ids \[G, n, L\], got \(2, 3\)"):
        rewards.duplicate_sources(torch.zeros(2, 3, dtype=torch.long))


def test_duplicate_sources_never_match_across_groups():
    # The same tokens in two groups are not duplicates of each other: every sample is its own source.
    ids = torch.tensor([[[7, 7]], [[7, 7]]])  # [G=2, n=1, L=2]
    assert rewards.duplicate_sources(ids).tolist() == [[0], [0]]


def test_structured_copies_are_found_by_the_tokens_the_feature_network_reads():
    from ebft.structured.rollout import Sample
    from ebft.structured.scoring import duplicate_samples

    def sample(seq, feature_length):
        return Sample(seq, 1, [False] + [True] * (len(seq) - 1), feature_length, True, "")

    # [5] is not a copy of [5, 1]: the shorter one is padded with a value that is no token id (1 is one).
    # [5, 1, 9] read up to its feature length 2 is [5, 1], a copy of sample 0.
    samples = [sample([5, 1], 2), sample([5], 1), sample([5, 1, 9], 2), sample([5], 1)]
    assert duplicate_samples(samples, 1, 4).tolist() == [[0, 1, 0, 1]]
    # As two groups of two, nothing matches across groups.
    assert duplicate_samples(samples, 2, 2).tolist() == [[0, 1], [0, 1]]


@pytest.mark.parametrize("space", ["feature", "sample"])
def test_near_duplicates_score_exactly_like_exact_duplicates(space):
    """Features of duplicates that differ by bf16-sized noise score as if they were bit-identical."""
    gen = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(0))
    gt = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    same_as = torch.tensor([[0, 1, 0, 3, 1], [0, 1, 2, 3, 4], [0, 0, 0, 3, 3]])
    exact = gen.gather(1, same_as[..., None].expand_as(gen))  # duplicates hold their source's row
    noisy = exact + 3e-4 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(2))
    noisy[same_as == torch.arange(5)] = exact[same_as == torch.arange(5)]  # sources keep their own row

    kwargs = {"alignment_coef": 1.0, "diversity_coef": 0.5, "use_whitening": True, "whitening_space": space}
    want = rewards.reward_terms(exact, gt, **kwargs)
    got = rewards.reward_terms(noisy, gt, same_as=same_as, **kwargs)
    for name in ("alignment", "diversity", "reward", "cfm"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    # Without sharing the noise is not harmless: whitening keeps the tiny extra directions (3e-4 is far
    # above its 1e-5 cut-off), so duplicates get rewards that differ by far more than the noise.
    unshared = rewards.reward_terms(noisy, gt, **kwargs)
    assert (unshared.reward[0, 2] - unshared.reward[0, 0]).abs() > 1e-2


def _llama(vocab=48, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


def _strided_settings(**over) -> StridedSettings:
    base = {
        "stride": 4,
        "context_length": 4,
        "generate_max_len": 4,
        "n_samples_per_prompt": 4,
        "temperature": 1.0,
        "top_p": 1.0,
        "min_completion_prefix": 0,
        "embed_method": "mean_pooling",
        "feature_norm": "per_layer",
        "use_whitening": True,
        "whitening_space": "feature",
        "alignment_coef": 1.0,
        "diversity_coef": 1.0,
        "advantage_estimator": "rloo",
        "rl_coef": 1.0,
        "ce_coef": 0.0,
    }
    base.update(over)
    return StridedSettings(**base)


@pytest.mark.parametrize(
    ("whitening", "space", "estimator"),
    [(True, "feature", "rloo"), (True, "sample", "group_norm"), (False, "feature", "rloo")],
)
def test_strided_identical_blocks_get_bitwise_identical_scores_under_bf16(whitening, space, estimator):
    """Hand-built rollouts where sample 2 repeats sample 0 and sample 3 repeats sample 1 in every block.

    The four samples of a block sit at different key positions of the packed row, so under bf16 autocast
    the feature pass gives the copies slightly different hidden states; their scores must still be equal
    bit for bit.
    """
    model = _llama()
    network = FeatureNetwork(model, feat.layer_indices([0.5, 1.0], 2), autocast_dtype=torch.bfloat16)
    s = _strided_settings(use_whitening=whitening, whitening_space=space, advantage_estimator=estimator)
    gen = torch.Generator().manual_seed(5)
    # Rows long enough (a 400-token document: chunks of more than 512 keys) that the CPU attention kernel splits
    # the keys of different copies differently; shorter rows happen to give equal bf16 features here.
    docs = [torch.randint(0, 48, (400,), generator=gen).tolist(), torch.randint(0, 48, (37,), generator=gen).tolist()]
    batch = collate_documents([{"input_ids": d, "labels": d} for d in docs], pad_token_id=0)
    layout = layout_for(batch, s)
    D, n, K, g = layout.num_docs, layout.n, layout.k, layout.g
    tokens = torch.randint(0, 48, (D, n, K, g), generator=gen)
    tokens[:, 2], tokens[:, 3] = tokens[:, 0], tokens[:, 1]
    packed = pack(batch.input_ids, tokens)
    plan = build_plan(layout, use_flex=False)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = score_rollouts(network, packed, plan, layout.position_ids(), layout, batch.labels, s)

    valid = layout.valid  # [D, K]
    for name in ("alignment", "diversity", "reward", "advantage"):
        values = getattr(scores, name)  # [D, n, K], zero on invalid blocks
        assert torch.equal(values[:, 2], values[:, 0]), name
        assert torch.equal(values[:, 3], values[:, 1]), name
    # The originals themselves differ (the test is not vacuous: distinct rollouts keep distinct scores).
    assert not torch.equal(scores.reward[:, 0][valid], scores.reward[:, 1][valid])


class _Jittered:
    """A feature network whose every output element carries seeded noise of ``size``: the last-bit differences
    copies of one completion get from kernels that sum in another order for another batch (bf16 on GPUs),
    which this machine's kernels may not show."""

    def __init__(self, inner: FeatureNetwork, size: float):
        self.inner, self.size, self.body = inner, size, inner.body
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, input_ids, position_ids, plan=None):
        hidden = self.inner(input_ids, position_ids, plan)
        return [h + self.size * torch.randn(h.shape, generator=self.gen) for h in hidden]


@pytest.mark.parametrize("jitter", [0.0, 3e-4])
def test_structured_identical_completions_get_bitwise_identical_scores_under_bf16(
    tiny_model_dir, tiny_tokenizer, jitter
):
    """Copies of one completion in different padded feature batches score the same, bit for bit, also when
    their features differ by precision noise (``jitter``)."""
    from transformers import AutoModelForCausalLM

    from ebft.data.structured import prompt_row
    from ebft.structured.rollout import Completion
    from ebft.structured.scoring import score
    from ebft.structured.step import _single_turn

    tok = tiny_tokenizer
    s = structured_settings(tok, num_generations=4, max_completion_length=32, use_whitening=True, sequence_len=128)

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    row = prompt_row(
        {"prompt": "def add(a, b):\n", "ground_truth": "    return a + b", "remaining_turns": []},
        tok,
        sequence_len=128,
        max_completion_length=32,
        chat_template_kwargs=None,
        source="test",
    )
    texts = ["    return a - b", "    return sum([a, b, 0, 0, 0, 0])", "    pass", "    return a - b"]
    samples = [_single_turn(row, Completion(tuple(ids(t) + [tok.eos_token_id]), True), s, tok) for t in texts]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float()
    network = FeatureNetwork(model, feat.layer_indices([0.5, 1.0], 4), autocast_dtype=torch.bfloat16)
    if jitter:
        network = _Jittered(network, jitter)
    # Feature batches of 3: sample 0 is padded to the long completion's width, its copy (sample 3) is
    # alone in the second batch and not padded at all.
    scores = score(network, [row], samples, s, tok.pad_token_id, batch_size=3)
    for name in ("alignment", "diversity", "reward", "advantage"):
        values = getattr(scores, name)[0]
        assert torch.equal(values[3], values[0]), name
        assert not torch.equal(values[1], values[0]), name

"""The strided step's scores against per-block features from plain forwards, the training autocast, and top-p
blocks drawn and scored inside the nucleus.
"""

from __future__ import annotations

import pytest
import torch
from strided_builders import document_row, random_model, strided_settings, teacher_forced_logp

from ebft import features as feat
from ebft.data.collate import collate_documents
from ebft.modeling.feature_network import FeatureNetwork
from ebft.strided.step import count_targets, document_generators, strided_microbatch


@pytest.mark.parametrize(("dtype", "band"), [(torch.bfloat16, (3e-3, 0.1)), (torch.float16, (1e-4, 3e-3))])
def test_rollouts_and_policy_pass_run_under_the_training_autocast(dtype, band):
    """Blocks are sampled under the autocast (the same draws as generate_blocks under it) and the policy pass
    runs under it: the log-probs differ from fp32 teacher forcing by that precision's rounding (measured here:
    ~1e-2 for bf16, ~1e-3 for fp16), so running in another precision shows."""
    from ebft.strided.generate import generate_blocks
    from ebft.strided.step import layout_for

    model = random_model(vocab=11)
    frozen = FeatureNetwork(model, feat.layer_indices([1.0], 2))
    # 8 samples x 8 blocks x 4 tokens = 256 draws at temperature 0.5: bf16 rounding of the logits (~1e-2) moves
    # a few of them (3 with this seed), so the comparison below can tell bf16 from fp32 sampling.
    s = strided_settings(n_samples_per_prompt=8, generate_max_len=4, temperature=0.5)
    doc = [3, 5, 1, 7, 2, 9, 4, 4, 6, 1, 2, 8, 10, 3, 3, 7, 1, 9, 5, 2]
    batch = collate_documents([document_row(doc)], pad_token_id=0)
    res = strided_microbatch(
        model,
        frozen,
        batch,
        s,
        count_targets(batch, s),
        generators=document_generators(2, 1, 0, 1, "cpu"),
        autocast_dtype=dtype,
        keep_rollouts=True,
    )
    record = res.rollouts[0]
    got = [[blk["tokens"] for blk in sample] for sample in record["samples"]]
    layout = layout_for(batch, s)

    def sample(autocast):
        with torch.no_grad():
            tokens = generate_blocks(
                model,
                batch.input_ids,
                layout,
                temperature=0.5,
                autocast_dtype=autocast,
                generators=document_generators(2, 1, 0, 1, "cpu"),
            )
        return tokens[0].tolist()

    assert got == sample(dtype)
    if dtype is torch.bfloat16:  # fp16 rounding is too fine to move a draw here
        assert got != sample(None)
    diffs = []
    with torch.no_grad():
        for sample_blocks in record["samples"]:
            for c, blk in zip(record["anchors"], sample_blocks, strict=True):
                want = teacher_forced_logp(model, doc[:c] + blk["tokens"], temperature=0.5)[c - 1 :]
                diffs.append(float((torch.tensor(blk["logprobs"]) - want).abs().max()))
    assert band[0] < max(diffs) < band[1]


def test_top_p_blocks_are_drawn_and_scored_inside_the_nucleus():
    """top_p < 1: every block token is drawn from its nucleus and scored under the renormalised nucleus
    (oracle: sorted probabilities of a plain forward of x[:c_k] + block, the smallest prefix reaching top_p)."""
    model = random_model(vocab=11)
    with torch.no_grad():  # flatter than _model's default, so the nucleus holds several tokens
        model.lm_head.weight.mul_(0.25)
    frozen = FeatureNetwork(model, feat.layer_indices([1.0], 2))
    top_p, temperature = 0.6, 0.9
    s = strided_settings(n_samples_per_prompt=6, generate_max_len=3, top_p=top_p, temperature=temperature)
    doc = [3, 5, 1, 7, 2, 9, 4, 4, 6, 1, 2, 8]
    batch = collate_documents([document_row(doc)], pad_token_id=0)
    gens = document_generators(3, 1, 0, 1, "cpu")
    res = strided_microbatch(model, frozen, batch, s, count_targets(batch, s), generators=gens, keep_rollouts=True)
    record = res.rollouts[0]
    sizes = []
    with torch.no_grad():
        for sample in record["samples"]:
            for c, block in zip(record["anchors"], sample, strict=True):
                seq = torch.tensor(doc[:c] + block["tokens"])[None]
                logits = model(seq).logits[0, c - 1 : c - 1 + 3].double() / temperature
                for t, token in enumerate(block["tokens"]):
                    p = logits[t].softmax(-1)
                    order = p.argsort(descending=True)
                    before = p[order].cumsum(0) - p[order]  # mass of the likelier tokens
                    nucleus = order[before < top_p]
                    sizes.append(len(nucleus))
                    assert token in nucleus.tolist()
                    want = float(torch.log(p[token] / p[nucleus].sum()))
                    assert block["logprobs"][t] == pytest.approx(want, abs=1e-4)
    assert max(sizes) > 1 and min(sizes) < 11  # the cut is real and leaves a choice

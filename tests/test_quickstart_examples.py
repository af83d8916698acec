"""The quickstart's example block: the block where the models' samples differ most, and the words for it."""

from __future__ import annotations

import json
import shutil

import torch

from ebft.config import parse_config
from ebft.quickstart import examples
from ebft.quickstart.settings import EBFT

NAMES = {"base": "base", "sft": "SFT", "ebft": "EBFT"}


def test_differing_samples_and_total_variation():
    a = torch.tensor([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])  # [n=2, K=2, g=2]
    b = torch.tensor([[[1, 2], [3, 9]], [[5, 0], [7, 8]]])
    # Block 0: sample 1 differs (6 vs 0); block 1: sample 0 differs (4 vs 9).
    assert examples.differing_samples(a, b).tolist() == [1, 1]
    assert examples.differing_samples(a, a).tolist() == [0, 0]
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.25, 0.5, 0.25], [0.0, 0.0, 1.0]])
    # 1/2 (0.25 + 0 + 0.25) = 0.25; 1/2 (1 + 0 + 1) = 1.
    assert examples.total_variation(p, q).tolist() == [0.25, 1.0]


def test_choose_block_prefers_more_differing_samples_then_larger_total_variation():
    valid = torch.tensor([True, True, True])
    assert examples.choose_block(torch.tensor([1, 3, 3]), torch.tensor([0.9, 0.1, 0.2]), valid) == 2
    assert examples.choose_block(torch.tensor([2, 1, 0]), torch.tensor([0.0, 1.0, 1.0]), valid) == 0
    # An invalid slot is never chosen, however much it differs.
    assert examples.choose_block(torch.tensor([0, 4, 0]), torch.tensor([0.1, 1.0, 0.0]), ~valid.roll(1, 0)) == 0


def _example_cfg(model_dir, data, out):
    return parse_config(
        {
            "base_model": str(model_dir),
            "rl": "ebft",
            "ebft": dict(EBFT),
            "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
            "sequence_len": 64,
            "output_dir": str(out),
            "seed": 0,
        },
        source="test",
    )


def test_example_blocks_identical_models_and_a_changed_one(tiny_model_dir, tmp_path):
    """Oracle: a model compared with itself draws the same samples everywhere (total variation 0); a model
    whose output head is changed draws different ones, and the block shown is one where they differ most."""
    from transformers import AutoModelForCausalLM

    data = tmp_path / "heldout.jsonl"
    data.write_text(json.dumps({"text": "def add(a, b):\n    return a + b\n" * 20}) + "\n")
    cfg = _example_cfg(tiny_model_dir, data, tmp_path / "out")
    same = examples.example_blocks(cfg, {"base": None, "sft": None}, 0)
    assert same["comparisons"]["sft vs base"]["blocks_differing"] == 0
    assert same["comparisons"]["sft vs base"]["max_total_variation"] == 0.0
    assert same["samples"]["sft"] == same["samples"]["base"]
    assert len(same["samples"]["base"]) == EBFT["n_samples_per_prompt"]

    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    model = AutoModelForCausalLM.from_pretrained(changed)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # sharper next-token distributions
    model.save_pretrained(changed)
    diff = examples.example_blocks(cfg, {"base": None, "sft": None, "ebft": changed}, 0)
    assert list(diff["comparisons"]) == ["sft vs base", "ebft vs base", "ebft vs sft"]
    shown = diff["comparisons"]["ebft vs sft"]
    assert shown["blocks_differing"] > 0 and shown["samples_differing"] > 0
    assert shown["max_total_variation"] > 0.0
    assert diff["samples"]["ebft"] != diff["samples"]["sft"]
    # The chosen block is one with the most differing samples of all blocks.
    assert diff["comparisons"]["sft vs base"]["blocks_differing"] == 0
    text = " ".join(examples.comparison_sentences(diff, NAMES))
    assert "SFT and base drew the same tokens in every sample" in text
    assert "EBFT and SFT: different samples in" in text


def test_example_section_shows_context_real_continuation_and_every_models_samples():
    comparisons = {
        "sft vs base": {
            "samples_differing": 0,
            "blocks_differing": 0,
            "total_variation": 0.0,
            "max_total_variation": 0.004,
        },
        "ebft vs sft": {
            "samples_differing": 2,
            "blocks_differing": 5,
            "total_variation": 0.2,
            "max_total_variation": 0.31,
        },
    }
    example = {
        "document": 3,
        "anchor": 64,
        "block": 7,
        "blocks": 15,
        "n": 2,
        "context": "def f(x):\n    return x < 1",
        "real": "    y = x & 2",
        "samples": {"base": ["a1", "a2"], "sft": ["b1", "b2"], "ebft": ["c1", "c2"]},
        "comparisons": comparisons,
    }
    page = examples.render_html(example, NAMES)
    assert "Held-out document 3, block 8 of 15 (cut at token\n64)" in page
    assert "return x &lt; 1" in page and "y = x &amp; 2" in page  # escaped, not raw HTML
    # One row per model, in order, each with all of its samples.
    rows = page.split("<tr>")[2:]
    assert [row.split("</td>")[0] for row in rows] == ["<td>base", "<td>SFT", "<td>EBFT"]
    assert all(
        f"<pre>{s}</pre>" in rows[i] for i, key in enumerate(example["samples"]) for s in example["samples"][key]
    )
    assert "same samples as base" not in page
    # Identical everywhere: said, with how little the distributions differ.
    assert "SFT and base drew the same tokens in every sample of all 15 blocks" in page
    assert "differ by at most 0.004" in page
    assert "EBFT and SFT: different samples in 5 of 15 blocks; in the block shown, 2 of 2 samples differ" in page
    # A model whose samples equal the base model's (same seeds) is marked as such.
    unchanged = {**example, "samples": {"base": ["a1"], "sft": ["a1"], "ebft": ["c1"]}}
    rows = examples.render_html(unchanged, {}).split("<tr>")[2:]
    assert ["same samples as base" in row for row in rows] == [False, True, False]
    assert examples.render_html({}, {}) == ""

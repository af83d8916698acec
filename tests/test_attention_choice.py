"""``attn_implementation`` honoured where it can be, axolotl's older attention flags and ``report_to`` mapped.
On the code before this change all of these keys were ignored with a warning."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from ebft.cli import main
from ebft.config import config_warnings, load_config, parse_config
from ebft.errors import ConfigError
from ebft.modeling.attention_choice import choose_attention
from ebft.modeling.policy import load_policy
from ebft.modeling.tokenizer import load_tokenizer

EVERYTHING = {"installed": lambda _: True, "cuda": True}
NOTHING = {"installed": lambda _: False, "cuda": False}
SAME = "which computes the same attention"


@pytest.mark.parametrize(
    ("requested", "machine", "chosen", "note"),
    [
        (None, NOTHING, None, None),
        ("eager", NOTHING, "eager", None),
        ("sdpa", NOTHING, "sdpa", None),
        ("flash_attention_2", EVERYTHING, "flash_attention_2", None),
        ("flash_attention_3", EVERYTHING, "flash_attention_3", None),
        ("flex_attention", EVERYTHING, "flex_attention", None),
        (
            "flash_attention_2",
            NOTHING,
            "sdpa",
            f"attn_implementation: flash_attention_2 needs the flash_attn package and a CUDA GPU; using sdpa, {SAME}",
        ),
        (
            "flash_attention_3",
            {"installed": lambda _: False, "cuda": True},
            "sdpa",
            f"attn_implementation: flash_attention_3 needs the flash_attn_interface package; using sdpa, {SAME}",
        ),
        (
            "flex_attention",
            NOTHING,
            "sdpa",
            f"attn_implementation: flex_attention has no backward pass on CPU; using sdpa, {SAME}",
        ),
        (
            "xformers",
            EVERYTHING,
            "sdpa",
            f"attn_implementation: xformers is not a transformers attention backend; using sdpa, {SAME}",
        ),
    ],
)
def test_choice(requested, machine, chosen, note):
    choice = choose_attention(requested, **machine)
    assert (choice.implementation, choice.note) == (chosen, note)


def test_a_model_class_without_the_backend_gets_the_closest_exact_one():
    no_sdpa = choose_attention("sdpa", **EVERYTHING, supports=lambda backend: backend != "sdpa")
    assert no_sdpa.implementation == "eager"
    assert no_sdpa.note == f"attn_implementation: this model class does not implement sdpa; using eager, {SAME}"
    # Gemma-2's class has no SDPA path: a flash request that cannot run falls back to eager, not sdpa.
    gemma = choose_attention("flash_attention_2", **NOTHING, supports=lambda backend: backend != "sdpa")
    assert gemma.implementation == "eager"


def _config(tmp_path, model_dir, **keys):
    raw = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {"mode": "structured"},
        "micro_batch_size": 4,
        "datasets": [{"path": str(tmp_path / "pairs.jsonl"), "type": "ebft_opencode.transform"}],
        "sequence_len": 64,
        "trl": {"num_generations": 4, "max_completion_length": 8},
        **keys,
    }
    return parse_config(raw)


def test_the_model_is_loaded_with_the_backend(tiny_model_dir, tmp_path, caplog, monkeypatch):
    from ebft.modeling import policy

    monkeypatch.setattr(policy, "_said", set())  # as in a fresh process (other tests here load flash configs)
    tokenizer = load_tokenizer(_config(tmp_path, tiny_model_dir))
    eager = load_policy(_config(tmp_path, tiny_model_dir, attn_implementation="eager"), tokenizer, torch.device("cpu"))
    assert eager.config._attn_implementation == "eager"
    flash = _config(tmp_path, tiny_model_dir, attn_implementation="flash_attention_2")
    with caplog.at_level(logging.WARNING, logger="ebft"):
        first = load_policy(flash, tokenizer, torch.device("cpu"))
        load_policy(flash, tokenizer, torch.device("cpu"))
    assert first.config._attn_implementation == "sdpa"  # no flash-attn and no GPU here
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attn_implementation:")]
    assert notes == [
        f"attn_implementation: flash_attention_2 needs the flash_attn package and a CUDA GPU; using sdpa, {SAME}"
    ]


@pytest.mark.parametrize("mode", ["structured", "strided"])
def test_eager_trains_exactly_like_sdpa(mode, tiny_model_dir, tmp_path):
    """Eager attention gets transformers' additive float mask, never a boolean one (which it would add to the
    scores): a run with it logs the metrics of the same run with SDPA. Structured mode then also runs its
    policy and feature passes padded (its prefix-sharing rows compute SDPA's attention), strided mode its own
    packed attention either way."""
    from conftest import stdlib_texts

    texts = [t[:1500] for t in stdlib_texts(8)]
    rows = [{"input": t.splitlines()[0][:40], "output": "\n".join(t.splitlines()[1:6])} for t in texts]
    if mode == "strided":
        rows = [{"text": t} for t in texts]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged = {}
    for backend in ("sdpa", "eager"):
        keys = {"attn_implementation": backend, "max_steps": 2, "output_dir": str(tmp_path / backend), "bf16": False}
        if mode == "strided":
            keys |= {
                "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 4},
                "datasets": [{"path": str(tmp_path / "pairs.jsonl"), "type": "ebft_pretrain.transform"}],
                "micro_batch_size": 2,
            }
        path = tmp_path / f"{backend}.yaml"
        raw = _config(tmp_path, tiny_model_dir, **keys).model_dump(mode="json")
        path.write_text(yaml.safe_dump(raw))
        assert main(["train", str(path)]) == 0
        lines = [json.loads(line) for line in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()]
        logged[backend] = [{k: v for k, v in line.items() if k.startswith("ebft/") or k == "loss"} for line in lines]
    for sdpa, eager in zip(logged["sdpa"], logged["eager"], strict=True):
        assert sdpa.keys() == eager.keys()
        assert all(eager[k] == pytest.approx(sdpa[k], abs=1e-4) for k in sdpa), (sdpa, eager)


@pytest.mark.parametrize(
    ("flags", "expected", "note"),
    [
        (
            {"flash_attention": True},
            "flash_attention_2",
            "flash_attention: read as attn_implementation: flash_attention_2",
        ),
        ({"sdp_attention": True}, "sdpa", "sdp_attention: read as attn_implementation: sdpa"),
        ({"eager_attention": True}, "eager", "eager_attention: read as attn_implementation: eager"),
        ({"flash_attention": False, "attn_implementation": "eager"}, "eager", None),
        ({"flash_attention": True, "attn_implementation": "flash_attention_2"}, "flash_attention_2", "flash_attention"),
    ],
)
def test_older_attention_flags(flags, expected, note):
    cfg = _minimal(**flags)
    assert cfg.attn_implementation == expected
    notes = config_warnings(cfg)
    assert (notes == []) if note is None else (len(notes) == 1 and notes[0].startswith(note))


def test_conflicting_attention_flags_are_refused():
    with pytest.raises(
        ConfigError,
        match="flash_attention: true means attn_implementation: flash_attention_2, which "
        "conflicts with attn_implementation: eager; keep only attn_implementation",
    ):
        _minimal(flash_attention=True, attn_implementation="eager")
    with pytest.raises(ConfigError, match="attn_implementation: must be 'eager', 'sdpa'"):
        _minimal(attn_implementation="kernels-community/flash-attn")


@pytest.mark.parametrize(
    ("keys", "tensorboard", "wandb", "note"),
    [
        ({"report_to": ["tensorboard"]}, True, None, "report_to: tensorboard read as use_tensorboard: true"),
        ({"report_to": "wandb", "wandb_project": "p"}, False, "p", None),
        ({"report_to": ["wandb", "tensorboard"], "wandb_project": "p"}, True, "p", "report_to: tensorboard"),
        ({"report_to": "none"}, False, None, None),
        ({"report_to": []}, False, None, None),
    ],
)
def test_report_to_maps_onto_the_tracker_keys(keys, tensorboard, wandb, note):
    cfg = _minimal(**keys)
    assert (cfg.use_tensorboard, cfg.wandb_project) == (tensorboard, wandb)
    notes = config_warnings(cfg)
    assert (notes == []) if note is None else (len(notes) == 1 and notes[0].startswith(note))


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"report_to": "wandb"}, "report_to: wandb needs the project to log to; set wandb_project: NAME"),
        (
            {"report_to": ["mlflow"]},
            "report_to: ebft reports to wandb and tensorboard (and always to "
            "output_dir/metrics.jsonl), not 'mlflow'; list only wandb and/or tensorboard",
        ),
        (
            {"report_to": "tensorboard", "use_tensorboard": False},
            "report_to: tensorboard conflicts with use_tensorboard: false",
        ),
    ],
)
def test_report_to_points_at_what_is_missing(keys, message):
    with pytest.raises(ConfigError) as info:
        _minimal(**keys)
    assert message in str(info.value)


def _minimal(**keys):
    raw = {"base_model": "m", "rl": "ebft", "ebft": {"mode": "strided"}, "datasets": [{"path": "d.jsonl"}], **keys}
    return parse_config(raw)


def test_validate_names_the_attention_fallback(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    cfg = _config(tmp_path, tiny_model_dir, attn_implementation="flash_attention_2")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["validate", str(path)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "attn_implementation: flash_attention_2 needs the flash_attn package and a CUDA GPU; using sdpa" in err
    assert load_config(path).attn_implementation == "flash_attention_2"  # the request stays in the config

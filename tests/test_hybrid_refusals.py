"""Honest refusals and the README's architecture section (docs/design.md §7): a model strided mode refuses is told
what works for it; a model kept off the packed row is logged with the true reason, once; the README lists,
per mode, exactly the model types the tests check and what each mode does with them."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import transformers
import yaml
from hybrid_models import FAMILIES, HYBRID, build_family, family_config, save_family

from ebft.attention.packed import unsupported_reason
from ebft.attention.support import (
    STRUCTURED_VERIFIED,
    VERIFIED,
    check_strided_architecture,
    log_structured_passes,
    strided_problems,
)
from ebft.cli import main
from ebft.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"
EXACTLY = "Use ebft.mode: structured, which trains it exactly"


@pytest.mark.parametrize("name", list(HYBRID))
def test_strided_refusal_of_a_hybrid_model_points_to_structured_mode(name):
    config = family_config(name)
    with pytest.raises(ConfigError) as info:
        check_strided_architecture(config)
    message = str(info.value)
    assert "cannot compute this" in message and "layer_types: [" in message
    assert EXACTLY in message and "sampled with the model's own cache" in message


def test_strided_refusal_of_the_multimodal_qwen35_wrapper_points_to_structured_mode():
    config = transformers.Qwen3_5Config(text_config=family_config("qwen3_5_text").to_dict())
    with pytest.raises(ConfigError, match=EXACTLY):
        check_strided_architecture(config)


@pytest.mark.parametrize(
    ("config", "hint"),
    [
        (transformers.GptOssConfig(), EXACTLY),
        (transformers.Llama4TextConfig(attention_chunk_size=8), "not verified for 'llama4_text'"),
        (transformers.Gemma3TextConfig(use_bidirectional_attention=True), "ebft trains causal language models"),
    ],
)
def test_strided_refusal_says_what_structured_mode_does_with_attention_models(config, hint):
    with pytest.raises(ConfigError) as info:
        check_strided_architecture(config)
    assert hint in str(info.value)
    assert (EXACTLY in str(info.value)) == (hint == EXACTLY)


def test_strided_training_of_a_recurrent_model_stops_before_weights_with_one_line(tmp_path, tiny_model_dir, capsys):
    model_dir = save_family("mamba2", tmp_path / "mamba2", tiny_model_dir)
    (model_dir / "model.safetensors").unlink()  # refused from config.json alone, before any weights load
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "def f(x):\n    return x\n" * 40}) + "\n", encoding="utf-8")
    run = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 4, "n_samples_per_prompt": 2},
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 48,
        "micro_batch_size": 1,
        "bf16": False,
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run), encoding="utf-8")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "cannot compute this 'mamba2' model exactly: layer_types: ['linear_attention']" in " ".join(err.split())
    assert EXACTLY in " ".join(err.split())


@pytest.mark.parametrize("name", ["mamba", "mamba2", "jamba", "qwen3_5_text"])
def test_the_padded_pass_is_logged_with_its_true_reason(name, caplog):
    """Mamba loads with eager attention, which it never uses: the reason is its recurrent layers."""
    model = build_family(name)
    with caplog.at_level(logging.INFO, logger="ebft"):
        log_structured_passes(model.config)
    layer_types = sorted(set(model.config.layer_types) - {"full_attention"})
    assert [r.getMessage() for r in caplog.records if r.name == "ebft"] == [
        "structured mode: feature and policy passes padded, one sequence per row, not packed: layers that are not "
        f"attention (layer types {layer_types}): their recurrent or convolutional state would run from one packed "
        "sequence into the next"
    ]


def test_a_model_the_packed_row_reproduces_is_logged_as_packed(caplog):
    with caplog.at_level(logging.INFO, logger="ebft"):
        log_structured_passes(build_family("llama").config)
    assert caplog.messages == [
        "structured mode: feature and policy passes packed (one row per batch, shared prefixes once)"
    ]


def _bullets(section: str) -> dict[str, set[str]]:
    """README bullets "- <label> (<why>): `type`, `type`, ..." (continued on indented lines) -> {label: types}."""
    out = {}
    for item in re.findall(r"^- (.+?)(?=\n- |\n\n|\Z)", section, flags=re.MULTILINE | re.DOTALL):
        label, rest = item.split(": ", 1)
        out[label.split(" (")[0]] = set(re.findall(r"`([a-z0-9_]+)`", rest))
    return out


def test_readme_lists_per_mode_what_each_does_with_each_tested_model_type():
    text = README.read_text(encoding="utf-8")
    section = text.split("### Supported architectures (structured mode)", 1)[1].split("\n#", 1)[0]
    listed = _bullets(section)
    want: dict[str, set[str]] = {"packed": set(), "padded, attention": set(), "padded, recurrent": set()}
    for name in FAMILIES:
        config = family_config(name)
        reason = unsupported_reason(build_family(name).config)
        if reason is None:
            want["packed"].add(config.model_type)
        elif reason.startswith("layers that are not attention"):
            want["padded, recurrent"].add(config.model_type)
        else:
            want["padded, attention"].add(config.model_type)
    want["padded, recurrent"].add("qwen3_5")  # the multimodal wrapper, as the hub checkpoints are
    assert listed == want
    # One list of model types for the matrix, the README and the strided refusal's "trains it exactly".
    assert set(STRUCTURED_VERIFIED) == set().union(*want.values())
    # The recurrent ones are exactly those strided mode refuses for their layer types.
    for name in HYBRID:
        assert any(p.startswith("layer_types:") for p in strided_problems(family_config(name)))
    assert want["padded, recurrent"].isdisjoint(VERIFIED)

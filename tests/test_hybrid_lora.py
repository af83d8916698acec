"""LoRA targets that fit the model (docs/design.md §7.2): ``lora_target_linear`` adapts every linear layer PEFT
accepts on the architecture and logs what it leaves out (PEFT refuses a Mamba mixer's ``out_proj``);
``lora_target_modules`` naming a module PEFT refuses is one ConfigError listing them, raised before the model is
touched; and a Mamba-2 model trains in structured mode end to end through the CLI."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import yaml
from hybrid_models import build_family, save_family

from ebft.cli import main
from ebft.errors import ConfigError
from ebft.modeling.adapters import _lora_module_names, add_adapter

# PEFT refuses LoRA on these module names for these model types (the rest of their linear layers it takes).
REFUSING = ["mamba", "mamba2", "falcon_h1", "nemotron_h"]


def _cfg(**over):
    base = {"lora_model_dir": None, "lora_r": 2, "lora_alpha": 4, "lora_dropout": 0.0}
    return SimpleNamespace(**{**base, "lora_target_linear": True, "lora_target_modules": None, **over})


def _linear_names(model) -> set[str]:
    """Every linear layer but the output head: what PEFT's all-linear means."""
    import torch

    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


@pytest.mark.parametrize("name", REFUSING)
def test_lora_target_linear_leaves_out_what_peft_refuses_and_says_so(name, caplog):
    model = build_family(name)
    linear = _linear_names(model)
    with caplog.at_level(logging.INFO, logger="ebft"):
        adapted = _lora_module_names(add_adapter(_cfg(), model))
    assert adapted == {n for n in linear if not n.endswith(".out_proj")}
    assert any(n.endswith(".in_proj") for n in adapted)
    logged = [r.getMessage() for r in caplog.records if r.name == "ebft"]
    assert logged == [f"lora_target_linear: no LoRA on out_proj: PEFT does not adapt those layers of a {name!r} model"]


@pytest.mark.parametrize("name", ["qwen3_5_text", "jamba", "bamba", "llama"])
def test_lora_target_linear_is_all_linear_where_peft_takes_everything(name, caplog):
    model = build_family(name)
    linear = _linear_names(model)
    with caplog.at_level(logging.INFO, logger="ebft"):
        adapted = _lora_module_names(add_adapter(_cfg(), model))
    assert adapted == linear
    assert not [r for r in caplog.records if r.name == "ebft"]


def test_lora_target_modules_peft_refuses_are_one_error_naming_them():
    model = build_family("mamba2")
    with pytest.raises(ConfigError) as info:
        add_adapter(_cfg(lora_target_linear=False, lora_target_modules=["in_proj", "out_proj", "conv1d"]), model)
    assert str(info.value) == (
        "lora_target_modules: PEFT cannot put LoRA on ['conv1d', 'out_proj'] in a 'mamba2' model; remove them "
        "(lora_target_linear: true adapts every linear layer PEFT accepts and leaves these out)"
    )
    assert not _lora_module_names(model)  # nothing was injected before the refusal
    # A regular expression is matched as PEFT matches it.
    with pytest.raises(ConfigError, match=r"\['out_proj'\]"):
        add_adapter(_cfg(lora_target_linear=False, lora_target_modules=r".*\.(in|out)_proj"), model)
    adapted = _lora_module_names(add_adapter(_cfg(lora_target_linear=False, lora_target_modules=["in_proj"]), model))
    assert adapted and all(n.endswith(".in_proj") for n in adapted)


def test_lora_target_modules_that_match_nothing_are_a_config_error():
    with pytest.raises(ConfigError, match="lora_target_modules: .*not found"):
        add_adapter(_cfg(lora_target_linear=False, lora_target_modules=["no_such_proj"]), build_family("mamba2"))


def _mamba2_run(tmp_path, tiny_model_dir, **top) -> dict:
    model_dir = save_family("mamba2", tmp_path / "mamba2", tiny_model_dir)
    data = tmp_path / "pairs.jsonl"
    rows = [{"input": f"def f{i}(x):", "output": f"    return x + {i}"} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {"mode": "structured", "feature_layers": [0.25, 0.5, 0.75]},
        "trl": {"num_generations": 2, "max_completion_length": 8},
        "datasets": [{"path": str(data), "type": "ebft_opencode.transform"}],
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 1,
        "bf16": False,
        "output_dir": str(tmp_path / "out"),
        **top,
    }


def _write(tmp_path, run: dict):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run), encoding="utf-8")
    return path


def test_a_mamba2_model_trains_in_structured_mode_with_lora_target_linear(tmp_path, tiny_model_dir, capsys):
    """It crashed on its first rollout and, with lora_target_linear, on PEFT's refusal before that."""
    path = _write(tmp_path, _mamba2_run(tmp_path, tiny_model_dir, lora_target_linear=True))
    assert main(["train", str(path)]) == 0
    log = " ".join(capsys.readouterr().err.split())
    assert "lora_target_linear: no LoRA on out_proj: PEFT does not adapt those layers of a 'mamba2' model" in log
    assert "rollouts: shared-prefill decoder" in log
    assert (
        "padded, one sequence per row, not packed: layers that are not attention (layer types ['linear_attention'])"
        in log
    )
    assert [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_lora_target_modules_peft_refuses_stop_the_cli_with_one_line(tmp_path, tiny_model_dir, capsys):
    path = _write(tmp_path, _mamba2_run(tmp_path, tiny_model_dir, lora_target_modules=["in_proj", "out_proj"]))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "lora_target_modules: PEFT cannot put LoRA on ['out_proj'] in a 'mamba2' model" in " ".join(err.split())

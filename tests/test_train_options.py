"""Strided training end to end through ``ebft.cli.main``: accumulation invariance, gradient checkpointing,
optimizers and learning-rate schedules, and the CLI's ``validate`` output and error exits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from config_builders import load_weights, max_abs_diff, read_jsonl, strided_config, train_run, write_run_config
from conftest import long_texts, write_jsonl

from ebft.cli import main
from ebft.config import load_config

# Wall-clock and memory readings differ between two otherwise identical runs.
TIMING_METRICS = ("tokens_per_second", "step_seconds", "peak_memory_mib")


def _sampled(out: Path) -> list:
    """The anchors and sampled tokens of every logged document, in log order."""
    records = read_jsonl(out / "rollouts.jsonl")
    return [(r["anchors"], [[block["tokens"] for block in sample] for sample in r["samples"]]) for r in records]


# ---------------------------------------------------------------------------------------------
# Invariances


@pytest.fixture(scope="module")
def varied_file(tmp_path_factory) -> Path:
    """Documents of different lengths, so a micro-batch of 4 pads where micro-batches of 1 do not."""
    rows = [{"text": text[: 80 + 30 * i]} for i, text in enumerate(long_texts())]
    return write_jsonl(tmp_path_factory.mktemp("data") / "varied.jsonl", rows)


def test_accumulation_split_does_not_change_the_run(tmp_path, tiny_model_dir, varied_file):
    def run(name: str, micro: int, accumulation: int) -> Path:
        config = strided_config(
            tiny_model_dir,
            varied_file,
            datasets=[{"path": str(varied_file), "type": "ebft_pretrain.transform", "pack": False}],
            ebft={"ce_coef": 0.1, "log_rollouts": True},
            sequence_len=96,
            optimizer="sgd",
            learning_rate=0.5,
            lr_scheduler="constant",
            micro_batch_size=micro,
            gradient_accumulation_steps=accumulation,
            logging_steps=1,
        )
        return train_run(tmp_path, name, config)

    one_by_four = run("1x4", 1, 4)
    four_by_one = run("4x1", 4, 1)

    for step in (1, 2):
        lengths = {r["length"] for r in read_jsonl(four_by_one / "rollouts.jsonl") if r["step"] == step}
        assert len(lengths) > 1, "the documents of a step must differ in length for padding to be exercised"
    moved = max_abs_diff(load_weights(one_by_four), load_weights(tiny_model_dir))
    assert moved > 1e-3, "the run must move the weights for the comparison to mean anything"
    assert max_abs_diff(load_weights(one_by_four), load_weights(four_by_one)) <= 1e-5

    metrics_a = read_jsonl(one_by_four / "metrics.jsonl")
    metrics_b = read_jsonl(four_by_one / "metrics.jsonl")
    assert len(metrics_a) == len(metrics_b) == 2
    for a, b in zip(metrics_a, metrics_b, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - set(TIMING_METRICS):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert _sampled(one_by_four) == _sampled(four_by_one)


@pytest.fixture(scope="module")
def no_checkpointing_run(tmp_path_factory, tiny_model_dir, text_file) -> Path:
    tmp = tmp_path_factory.mktemp("gc")
    return train_run(tmp, "plain", _gc_config(tiny_model_dir, text_file, gradient_checkpointing=False))


def _gc_config(model_dir, data, **top) -> dict:
    return strided_config(
        model_dir, data, optimizer="sgd", learning_rate=1.0, max_grad_norm=None, logging_steps=1, **top
    )


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_does_not_change_the_update(
    tmp_path, tiny_model_dir, text_file, no_checkpointing_run, reentrant
):
    config = _gc_config(
        tiny_model_dir,
        text_file,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    out = train_run(tmp_path, "checkpointed", config)
    plain = [line["grad_norm"] for line in read_jsonl(no_checkpointing_run / "metrics.jsonl")]
    checkpointed = [line["grad_norm"] for line in read_jsonl(out / "metrics.jsonl")]
    assert checkpointed == pytest.approx(plain, rel=1e-5)
    assert max_abs_diff(load_weights(out), load_weights(no_checkpointing_run)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Optimizers and learning-rate schedules


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "extra", "factors"),
    [
        # transformers' schedules, evaluated at scheduler step s = 0, 1 (optimizer steps 1, 2), 2 steps in all:
        # cosine, no warmup: 0.5 * (1 + cos(pi * s / 2)) -> 0.5 * (1 + 1) = 1.0, 0.5 * (1 + 0) = 0.5
        ("adamw_torch", "cosine", {}, (1.0, 0.5)),
        # linear, no warmup: (2 - s) / 2 -> 1.0, 0.5
        ("adamw_torch_fused", "linear", {}, (1.0, 0.5)),
        ("sgd", "constant", {}, (1.0, 1.0)),
        # constant_with_warmup, warmup 2: s / 2 while s < 2 -> 0 / 2 = 0.0, 1 / 2 = 0.5
        ("sgd", "constant_with_warmup", {"warmup_steps": 2}, (0.0, 0.5)),
    ],
)
def test_optimizer_and_schedule(tmp_path, tiny_model_dir, text_file, optimizer, scheduler, extra, factors):
    lr = 1e-3
    config = strided_config(
        tiny_model_dir,
        text_file,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        learning_rate=lr,
        logging_steps=1,
        save_steps=1,
        **extra,
    )
    out = train_run(tmp_path, "opt", config)

    # The logged rate is the one the step used.
    logged = [line["learning_rate"] for line in read_jsonl(out / "metrics.jsonl")]
    assert logged == pytest.approx([lr * f for f in factors], rel=1e-9, abs=0.0)

    base, after_one = load_weights(tiny_model_dir), load_weights(out / "checkpoint-1")
    if factors[0] == 0.0:
        assert max_abs_diff(after_one, base) == 0.0, "a step at learning rate 0 must not move the weights"
    else:
        assert max_abs_diff(after_one, base) > 0.0
    if optimizer.startswith("adamw"):
        # First Adam step, bias-corrected: m = g, v = g^2, so each weight moves by lr * g / (|g| + 1e-8),
        # i.e. by lr = 1e-3 wherever its gradient is not ~0 (weight_decay 0).
        moves = torch.cat([(after_one[k].double() - base[k].double()).abs().flatten() for k in base])
        assert float(moves.max()) == pytest.approx(lr, rel=1e-3)
        assert float(moves.max()) <= lr * (1 + 1e-3)
    assert max_abs_diff(load_weights(out), after_one) > 0.0


# ---------------------------------------------------------------------------------------------
# CLI


def test_validate_prints_the_resolved_config(tmp_path, text_file, capsys):
    # A hub id that cannot be reached here: validate must not touch the model.
    config = strided_config("meta-llama/Llama-3.2-1B", text_file)
    path = write_run_config(tmp_path, "v", config)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == load_config(path).model_dump()
    assert not (tmp_path / "v").exists(), "validate must not create output_dir"


def test_validate_keeps_warnings_out_of_the_yaml(tmp_path, text_file, capsys):
    config = strided_config("meta-llama/Llama-3.2-1B", text_file, flash_attention=True)
    path = write_run_config(tmp_path, "v", config)
    assert main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert "flash_attention: read as attn_implementation: flash_attention_2" in " ".join(captured.err.split())
    assert "flash_attention:" not in captured.out
    assert yaml.safe_load(captured.out) == load_config(path).model_dump()


def _fails(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit code 2 and a one-line-start ``error:`` on stderr; returns stderr. Only log lines
    may come before it (``ebft train`` logs the memory plan before it reads the data)."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    before, found, _ = captured.err.partition("error: ")
    assert found and (before == "" or before.endswith("\n"))
    assert all(line.startswith(("INFO ", " ")) for line in before.splitlines()), before
    assert "Traceback" not in captured.err + captured.out
    return captured.err


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path, tiny_model_dir, text_file, capsys):
    config = strided_config(tiny_model_dir, text_file, ebft={"strid": 4})
    path = write_run_config(tmp_path, "bad", config)
    for command in ("validate", "train"):
        err = _fails(capsys, [command, str(path)])
        assert "ebft.strid" in err and "did you mean 'stride'?" in err
    assert not (tmp_path / "bad").exists()


def test_invalid_override_is_an_error(tmp_path, tiny_model_dir, text_file, capsys):
    path = write_run_config(tmp_path, "ok", strided_config(tiny_model_dir, text_file))
    err = _fails(capsys, ["train", str(path), "--ebft.stride=0"])
    assert "ebft.stride: must be >= 1 (got 0)" in err


def test_missing_dataset_file_is_an_error(tmp_path, tiny_model_dir, capsys):
    missing = tmp_path / "nowhere" / "train.jsonl"
    path = write_run_config(tmp_path, "nodata", strided_config(tiny_model_dir, missing))
    err = _fails(capsys, ["train", str(path)])
    assert str(missing) in err

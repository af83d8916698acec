"""Evaluation during training end to end through ``ebft.cli.main``.

* A run with evaluation trains bitwise as one without (same metrics, same weights), in both modes.
* What it logs at step N is what ``ebft evaluate`` reports for the checkpoint of step N (and at step 0 for the
  base model): the same rows, seeds, model and feature network, loaded from disk instead of taken in memory.
* Early stopping stops where transformers' rule, recomputed here from metrics.jsonl, says; load_best_model_at_end
  hands over the best checkpoint's weights, the run card says which step they are from, rotation keeps it, and a
  resumed run continues the decision exactly.
* Two processes (FSDP2, gloo) log what one process logs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import stdlib_texts
from launchers import train_on_two_processes
from safetensors.torch import load_file

from ebft.cli import main
from ebft.config import load_config
from ebft.errors import ConfigError
from ebft.evaluate.run import evaluate
from ebft.sft.runner import mode as sft_mode
from ebft.train.loop import train

TIMING = ("tokens_per_second", "step_seconds", "peak_memory_mib")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "code.jsonl"
    path.write_text("".join(json.dumps({"text": t[:3000]}) + "\n" for t in stdlib_texts(12)))
    return path


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> tuple[Path, Path]:
    """Prompt/answer rows: a module's first line asks, the next lines answer; 8 to train on, 4 held out."""
    rows = []
    for text in stdlib_texts(12):
        lines = [line for line in text.splitlines() if line.strip()]
        rows.append({"input": lines[0][:60], "output": "\n".join(lines[1:4])})
    folder = tmp_path_factory.mktemp("pairs")
    train, test = folder / "train.jsonl", folder / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    return train, test


def _strided(model: Path, data: Path, **over) -> dict:
    cfg = {
        "base_model": str(model),
        "rl": "ebft",
        "ebft": {
            "mode": "strided",
            "stride": 8,
            "context_length": 8,
            "generate_max_len": 4,
            "n_samples_per_prompt": 3,
            "temperature": 1.0,
            "ce_coef": 0.05,
        },
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,  # dropout draws from torch's global generator: evaluation must leave it alone
        "lora_target_linear": True,
        "bf16": False,
        "seed": 3,
        "val_set_size": 6,
    }
    cfg.update(over)
    return cfg


def _write(tmp_path: Path, cfg: dict, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(tmp_path / name)}))
    return path


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _training(run: Path) -> list[dict]:
    """The training records, without wall-clock and memory readings."""
    return [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in _records(run)
        if not any(k.startswith("eval/") for k in r)
    ]


def _evaluations(run: Path) -> dict[int, dict]:
    """The evaluation records by step, without how long each took."""
    return {
        r["step"]: {k: v for k, v in r.items() if k != "eval/seconds"} for r in _records(run) if "eval/cfm_loss" in r
    }


def _same_weights(a: Path, b: Path, name: str) -> bool:
    wa, wb = load_file(a / name), load_file(b / name)
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


@pytest.fixture(scope="module")
def strided_runs(tmp_path_factory, tiny_model_dir, text_file):
    """The same strided run without and with evaluation (every step, and before the first)."""
    tmp = tmp_path_factory.mktemp("strided")
    plain = _write(tmp, _strided(tiny_model_dir, text_file), "plain")
    evaluated = _write(tmp, _strided(tiny_model_dir, text_file, eval_steps=1, eval_max_docs=4, save_steps=2), "eval")
    assert main(["train", str(plain)]) == 0
    assert main(["train", str(evaluated)]) == 0
    return tmp / "plain", tmp / "eval", evaluated


def test_evaluation_does_not_change_training(strided_runs):
    plain, evaluated, _ = strided_runs
    assert sorted(_evaluations(evaluated)) == [0, 1, 2, 3, 4]  # eval_on_start (axolotl's default) and every step
    assert _training(evaluated) == _training(plain)  # bitwise: every loss, reward, gradient norm, learning rate
    assert _same_weights(evaluated, plain, "adapter_model.safetensors")


def test_logged_evaluations_are_those_of_ebft_evaluate(strided_runs):
    _, run, cfg_path = strided_runs
    cfg = load_config(cfg_path)
    logged = _evaluations(run)
    for step, checkpoint in ((2, run / "checkpoint-2"), (0, None)):
        result = evaluate(cfg, checkpoint=checkpoint, max_docs=4, config_dir=cfg_path.parent)
        assert result.info["data"]["documents"] == 4
        for key, value in result.metrics.items():
            assert logged[step][f"eval/{key}"] == value, (step, key)


def _stop_by_hand(evaluations: dict[int, dict], metric: str, patience: int) -> tuple[int | None, int]:
    """transformers' rule, written out: the step patience evaluations without a strict improvement end at (None:
    never), and the best step (the earliest of equal values); step 0 is compared with nothing."""
    best, best_step, bad = None, None, 0
    for step in sorted(s for s in evaluations if s > 0):
        value = evaluations[step][metric]
        if best is None or value < best:
            best, best_step, bad = value, step, 0
        else:
            bad += 1
            if bad >= patience:
                return step, best_step
    return None, best_step


def _stopping(model: Path, data: Path, **over) -> dict:
    # A learning rate this large makes the held-out cross-entropy go up and down: early stopping has work to do.
    keys = {
        "learning_rate": 0.05,
        "lr_scheduler": "constant",
        "lora_dropout": 0.0,
        "max_steps": 12,
        "eval_steps": 1,
        "eval_max_docs": 4,
        "eval_on_start": False,
        "save_steps": 1,
        "save_total_limit": 2,
        "early_stopping_patience": 2,
        "metric_for_best_model": "eval_ce_loss",
        "load_best_model_at_end": True,
    }
    return _strided(model, data, **{**keys, **over})


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_model_dir, text_file):
    tmp = tmp_path_factory.mktemp("stopping")
    assert main(["train", str(_write(tmp, _stopping(tiny_model_dir, text_file), "run"))]) == 0
    return tmp / "run"


def test_early_stopping_and_the_best_model(stopped_run):
    run = stopped_run
    evaluations = _evaluations(run)
    stop, best = _stop_by_hand(evaluations, "eval/ce_loss", patience=2)
    assert stop is not None and stop < 12 and best != stop  # this run stops early, after its best step
    assert max(evaluations) == stop and max(r["step"] for r in _records(run)) == stop
    assert [p.name for p in sorted(run.glob("checkpoint-*"))] == sorted([f"checkpoint-{best}", f"checkpoint-{stop}"])
    # The final model is the best checkpoint's, not the last step's.
    assert _same_weights(run, run / f"checkpoint-{best}", "adapter_model.safetensors")
    assert not _same_weights(run, run / f"checkpoint-{stop}", "adapter_model.safetensors")
    card = (run / "README.md").read_text()
    assert f"The weights after optimizer step {best} of {stop}: checkpoint-{best}, the best eval/ce_loss" in card
    assert f"Training stopped early at step {stop}: eval/ce_loss had not improved" in card
    assert f"| eval/ce_loss | {evaluations[best]['eval/ce_loss']:.6g} |" in card
    state = json.loads((run / f"checkpoint-{stop}" / "trainer_state.json").read_text())["evaluation"]
    assert (state["best_step"], state["bad_evals"], state["kept_step"]) == (best, 2, best)


def test_a_resumed_run_continues_early_stopping_exactly(tmp_path, tiny_model_dir, text_file, stopped_run):
    """Train to one step before the stop (a finished run, its last checkpoint one evaluation short of the
    patience), then extend it: it stops at the same step with the same final model."""
    full = stopped_run
    stop, best = _stop_by_hand(_evaluations(full), "eval/ce_loss", patience=2)
    cfg = _write(tmp_path, _stopping(tiny_model_dir, text_file), "part")
    assert main(["train", str(cfg), f"--max_steps={stop - 1}"]) == 0
    assert main(["train", str(cfg), "--resume_from_checkpoint=latest"]) == 0
    part = tmp_path / "part"
    assert _evaluations(part) == _evaluations(full)
    assert _same_weights(part, full, "adapter_model.safetensors")
    assert f"Training stopped early at step {stop}" in (part / "README.md").read_text()


def _structured(model: Path, train: Path, test: Path, **over) -> dict:
    cfg = {
        "base_model": str(model),
        "rl": "ebft",
        "ebft": {"mode": "structured", "ce_coef": 0.05},
        "trl": {"num_generations": 2, "max_completion_length": 8, "temperature": 1.0},
        "datasets": [{"path": str(train), "type": "ebft_opencode.transform"}],
        "test_datasets": [{"path": str(test), "type": "ebft_opencode.transform"}],
        "sequence_len": 96,
        "micro_batch_size": 4,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "bf16": False,
        "seed": 0,
    }
    cfg.update(over)
    return cfg


def test_structured_mode_evaluates_test_datasets_without_changing_training(tmp_path, tiny_model_dir, pair_files):
    train_file, test_file = pair_files
    plain = _write(tmp_path, _structured(tiny_model_dir, train_file, test_file), "plain")
    evaluated = _write(tmp_path, _structured(tiny_model_dir, train_file, test_file, eval_steps=1, save_steps=1), "eval")
    assert main(["train", str(plain)]) == 0
    assert main(["train", str(evaluated)]) == 0
    run = tmp_path / "eval"
    assert _training(run) == _training(tmp_path / "plain")
    assert _same_weights(run, tmp_path / "plain", "model.safetensors")
    logged = _evaluations(run)
    assert sorted(logged) == [0, 1, 2] and logged[2]["eval/completion_length"] > 0
    result = evaluate(load_config(evaluated), checkpoint=run / "checkpoint-1", config_dir=tmp_path)
    assert result.info["data"]["source"] == "test_datasets rows" and result.info["data"]["prompts"] == 4
    for key, value in result.metrics.items():
        assert logged[1][f"eval/{key}"] == value, key


def test_a_mode_without_evaluation_refuses_before_loading(tmp_path, tiny_model_dir, text_file):
    cfg = load_config(_write(tmp_path, _strided(tiny_model_dir, text_file, eval_steps=1), "sft"))
    with pytest.raises(ConfigError, match="this mode offers no evaluation during training"):
        train(cfg, sft_mode())
    assert not (tmp_path / "sft").exists()


def test_two_sharded_processes_evaluate_as_one(tmp_path, tiny_model_dir, text_file):
    """FSDP2 on 2 processes: each scores its share of 5 held-out documents (2 and 3) on gathered weights; the
    summed metrics, and the early-stopping decision taken from them on every process, are one process's."""
    config = _strided(
        tiny_model_dir,
        text_file,
        adapter=None,
        lora_dropout=0.0,
        optimizer="sgd",
        eval_steps=1,
        eval_max_docs=5,
        early_stopping_patience=1,
        metric_for_best_model="eval/reward",
        max_steps=3,
    )
    for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_linear"):
        config.pop(key)
    two, one = tmp_path / "two", tmp_path / "one"
    cfg = _write(tmp_path, {**config, "fsdp_version": 2}, "two")
    train_on_two_processes(cfg, "--micro_batch_size=1", port=29751, launcher="torchrun", timeout=240)
    assert main(["train", str(_write(tmp_path, config, "one"))]) == 0
    a, b = _evaluations(two), _evaluations(one)
    assert sorted(a) == sorted(b)  # the same evaluations, and the same stop, on every process
    for step in a:
        for key, value in b[step].items():
            assert a[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)

"""Training end to end through ``ebft.cli.main`` on the tiny local model.

What a run leaves behind (metrics, checkpoints, loadable models, the resolved config), the rollout log
checked against the logged loss and the reward formulas, accumulation invariance, optimizers and
learning-rate schedules, gradient checkpointing, and the CLI's error exits.

Layout arithmetic used below: with ``pack: false`` every stdlib document (thousands of tokens) is cut
to exactly ``sequence_len`` tokens, so every row has the same, hand-computable anchors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import stdlib_texts
from safetensors.torch import load_file

from ebft.cli import main
from ebft.config import load_config

SEED_METRICS = (
    "ebft/alignment",
    "ebft/diversity",
    "ebft/mean_reward",
    "ebft/cfm_loss",
    "ebft/rl_loss",
    "ebft/advantages_std",
    "ebft/num_blocks",
    "loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "peak_memory_mib",
)
# Wall-clock and memory readings differ between two otherwise identical runs.
TIMING_METRICS = ("tokens_per_second", "step_seconds", "peak_memory_mib")
ROLLOUT_KEYS = {"step", "document", "input_ids", "input_text", "length", "anchors", "samples"}
BLOCK_KEYS = {"tokens", "text", "logprobs", "alignment", "diversity", "reward", "advantage"}


# ---------------------------------------------------------------------------------------------
# Helpers


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _long_texts() -> list[str]:
    """Stdlib modules of at least 2000 characters (hundreds of tokens each), capped to keep tokenizing fast."""
    return [text[:6000] for text in stdlib_texts(16) if len(text) >= 2000]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("data") / "text.jsonl", [{"text": t} for t in _long_texts()])


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    """Prompt/completion rows: a module's first line asks, the next lines answer."""
    rows = []
    for text in _long_texts():
        lines = text.splitlines()
        rows.append({"input": lines[0][:60], "output": "\n".join(lines[1:25])})
    return _write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)


def _config(model_dir: Path | str, data: Path, **top) -> dict:
    """A small strided config; keyword arguments replace top-level keys, ``ebft`` is merged."""
    ebft = {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8, "n_samples_per_prompt": 4}
    ebft.update(top.pop("ebft", {}))
    config = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": ebft,
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 64,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "bf16": False,
        "seed": 0,
    }
    config.update(top)
    return config


def _fixed_rows(data: Path) -> list[dict]:
    """One row per document, cut to sequence_len (see the module docstring)."""
    return [{"path": str(data), "type": "ebft_pretrain.transform", "pack": False}]


def _write_config(tmp_path: Path, name: str, config: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path / name)}), encoding="utf-8")
    return path


def _train(tmp_path: Path, name: str, config: dict, *overrides: str) -> Path:
    """Train through the CLI and return output_dir; the run must succeed."""
    path = _write_config(tmp_path, name, config)
    assert main(["train", str(path), *overrides]) == 0
    return tmp_path / name


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _sampled(out: Path) -> list:
    """The anchors and sampled tokens of every logged document, in log order."""
    records = _read_jsonl(out / "rollouts.jsonl")
    return [(r["anchors"], [[block["tokens"] for block in sample] for sample in r["samples"]]) for r in records]


def _blocks(record: dict):
    """Every (sample, block) entry of one rollout record."""
    return [block for sample in record["samples"] for block in sample]


# ---------------------------------------------------------------------------------------------
# What a run leaves in output_dir


def test_full_finetune_outputs(tmp_path, tiny_model_dir, text_file):
    config = _config(
        tiny_model_dir,
        text_file,
        datasets=_fixed_rows(text_file),
        ebft={"ce_coef": 0.05, "rl_coef": 0.5},
        max_steps=4,
        logging_steps=2,
        save_steps=2,
    )
    path = _write_config(tmp_path, "run", config)
    assert main(["train", str(path)]) == 0
    out = tmp_path / "run"

    lines = _read_jsonl(out / "metrics.jsonl")
    assert [line["step"] for line in lines] == [2, 4]  # logging_steps 2 over 4 steps
    for line in lines:
        missing = [name for name in (*SEED_METRICS, "ebft/ce_loss") if name not in line]
        assert not missing, f"metrics.jsonl lacks {missing}"
        assert all(math.isfinite(line[name]) for name in SEED_METRICS)
        assert line["loss"] == pytest.approx(0.5 * line["ebft/rl_loss"] + 0.05 * line["ebft/ce_loss"], rel=1e-6)
        # Rows of 64 tokens, anchors 8, 16, ..., 56 (c + 8 <= 64): (64 - 8 - 8) // 8 + 1 = 7 blocks.
        assert line["ebft/num_blocks"] == 7.0
        assert line["grad_norm"] > 0

    # save_steps 2 over 4 steps: checkpoints after steps 2 and 4 (the last, so the run can be extended), and
    # the final model in output_dir itself.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2

    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = _weights(tiny_model_dir)
    for directory in (out, out / "checkpoint-2"):
        model = AutoModelForCausalLM.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert len(tokenizer) == model.config.vocab_size
        loaded = {k: v for k, v in model.state_dict().items() if k in base}
        assert _max_abs_diff(loaded, _weights(directory)) == 0.0
        assert _max_abs_diff(loaded, base) > 0.0, "training did not change the weights"
        # The saved config is what users load for inference: the KV cache stays on, as in the base model.
        assert json.loads((directory / "config.json").read_text())["use_cache"] is True
        assert model.config.use_cache is True
    assert json.loads((tiny_model_dir / "config.json").read_text())["use_cache"] is True
    assert _max_abs_diff(_weights(out), _weights(out / "checkpoint-2")) > 0.0

    assert load_config(out / "config.yaml") == load_config(path)


def test_lora_outputs(tmp_path, tiny_model_dir, text_file):
    config = _config(
        tiny_model_dir, text_file, adapter="lora", lora_r=4, lora_target_linear=True, save_steps=1, logging_steps=1
    )
    out = _train(tmp_path, "lora", config)

    assert [line["step"] for line in _read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert not (out / "model.safetensors").exists(), "a LoRA run saves the adapter, not the full model"
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    for directory in (out, out / "checkpoint-1"):
        saved = load_file(directory / "adapter_model.safetensors")
        lora_b = [v for k, v in saved.items() if "lora_B" in k]
        assert lora_b and any(v.abs().max() > 0 for v in lora_b), "lora_B starts at 0 and must have trained"
        # The adapter names its base model, so it loads on its own.
        model = AutoPeftModelForCausalLM.from_pretrained(directory)
        state = model.state_dict()
        for key, value in saved.items():
            match = [k for k in state if k.replace(".default", "") == key]
            assert len(match) == 1 and torch.equal(state[match[0]], value)
        AutoTokenizer.from_pretrained(directory)
    assert load_config(out / "config.yaml") == load_config(tmp_path / "lora.yaml")


# ---------------------------------------------------------------------------------------------
# The rollout log against the loss and the reward formulas


def test_rollout_log_matches_the_loss(tmp_path, tiny_model_dir, text_file):
    alignment_coef, diversity_coef = 1.5, 0.5
    config = _config(
        tiny_model_dir,
        text_file,
        datasets=_fixed_rows(text_file),
        ebft={
            "context_length": 5,
            "stride": 6,
            "generate_max_len": 4,
            "alignment_coef": alignment_coef,
            "diversity_coef": diversity_coef,
            "advantage_estimator": "rloo",
            "use_whitening": False,
            "ce_coef": 0.0,
            "log_rollouts": True,
        },
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=1,
    )
    out = _train(tmp_path, "rollouts", config)
    n, g = 4, 4
    metrics = {line["step"]: line for line in _read_jsonl(out / "metrics.jsonl")}
    records = _read_jsonl(out / "rollouts.jsonl")

    # One object per document per optimizer step: 2 x 2 documents in each of 2 steps.
    assert [(r["step"], r["document"]) for r in records] == [(s, d) for s in (1, 2) for d in range(4)]
    # Anchors c_k = 5 + 6k with c_k + 4 <= 64: k <= (64 - 4 - 5) / 6 = 9.17, so k = 0..9, the last at 59.
    anchors = [5, 11, 17, 23, 29, 35, 41, 47, 53, 59]
    for record in records:
        assert set(record) == ROLLOUT_KEYS
        assert record["length"] == 64
        assert record["anchors"] == anchors
        assert len(record["samples"]) == n
        for sample in record["samples"]:
            assert len(sample) == len(anchors)
            for block in sample:
                assert set(block) == BLOCK_KEYS
                assert len(block["tokens"]) == g and all(isinstance(t, int) for t in block["tokens"])
                assert len(block["logprobs"]) == g and all(lp <= 0.0 for lp in block["logprobs"])
                # reward = alignment_coef * alignment - diversity_coef * diversity
                expected = alignment_coef * block["alignment"] - diversity_coef * block["diversity"]
                assert block["reward"] == pytest.approx(expected, abs=1e-5)

        # RLOO (docs/design.md §5) per group (document, block), n = 4: alignment baseline (S_a - a_j) / 3,
        # diversity baseline (S_d - 2 d_j) / 2; A_j = 1.5 (a_j - base_a) - 0.5 (d_j - base_d).
        for k in range(len(anchors)):
            group = [record["samples"][i][k] for i in range(n)]
            s_a = sum(b["alignment"] for b in group)
            s_d = sum(b["diversity"] for b in group)
            for b in group:
                base_a = (s_a - b["alignment"]) / (n - 1)
                base_d = (s_d - 2 * b["diversity"]) / (n - 2)
                expected = alignment_coef * (b["alignment"] - base_a) - diversity_coef * (b["diversity"] - base_d)
                assert b["advantage"] == pytest.approx(expected, abs=1e-5)

    for step in (1, 2):
        blocks = [b for r in records if r["step"] == step for b in _blocks(r)]
        # RL loss = mean over every generated token of -A * log p (the block's advantage on each of its g tokens).
        terms = [-b["advantage"] * lp for b in blocks for lp in b["logprobs"]]
        assert len(terms) == 4 * n * len(anchors) * g
        line = metrics[step]
        assert line["ebft/rl_loss"] == pytest.approx(sum(terms) / len(terms), rel=1e-4, abs=1e-6)
        assert line["loss"] == pytest.approx(line["ebft/rl_loss"], rel=1e-6)
        assert "ebft/ce_loss" not in line
        # The logged means are over every (document, sample, block).
        for name, key in (("ebft/alignment", "alignment"), ("ebft/diversity", "diversity")):
            assert line[name] == pytest.approx(sum(b[key] for b in blocks) / len(blocks), abs=1e-5)
        assert line["ebft/mean_reward"] == pytest.approx(sum(b["reward"] for b in blocks) / len(blocks), abs=1e-5)
        adv = torch.tensor([b["advantage"] for b in blocks], dtype=torch.float64)
        assert line["ebft/advantages_std"] == pytest.approx(float(adv.std(unbiased=False)), abs=1e-5)
        assert line["ebft/num_blocks"] == len(anchors)


def test_rollout_anchors_start_inside_the_completion(tmp_path, tiny_model_dir, tiny_tokenizer, pair_file):
    context, stride, g, prefix = 4, 5, 3, 3
    config = _config(
        tiny_model_dir,
        pair_file,
        datasets=[{"path": str(pair_file), "type": "ebft_strided_structured.transform"}],
        ebft={
            "context_length": context,
            "stride": stride,
            "generate_max_len": g,
            "n_samples_per_prompt": 2,
            "min_completion_prefix": prefix,
            "log_rollouts": True,
        },
        sequence_len=96,
    )
    out = _train(tmp_path, "pairs", config)

    # The row a record came from, rebuilt as the transform documents it: prompt ids, then completion + EOS.
    prompt_length = {}
    for row in _read_jsonl(pair_file):
        prompt = tiny_tokenizer(row["input"])["input_ids"]
        completion = tiny_tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        prompt_length[tuple((prompt + completion + [tiny_tokenizer.eos_token_id])[:96])] = len(prompt)
    records = _read_jsonl(out / "rollouts.jsonl")
    assert len(records) == 2 * 2  # 2 documents in each of 2 steps
    for record in records:
        length = record["length"]
        p = prompt_length[tuple(record["input_ids"][:length])]
        # docs/design.md §4.1: a = max(context_length, prompt_length + min_completion_prefix)
        first = max(context, p + prefix)
        count = (length - g - first) // stride + 1  # every c_k = first + k * stride with c_k + g <= length
        assert record["anchors"] == [first + k * stride for k in range(count)]


def test_single_sample_falls_back_to_reinforce(tmp_path, tiny_model_dir, text_file, capsys):
    config = _config(
        tiny_model_dir,
        text_file,
        ebft={"n_samples_per_prompt": 1, "advantage_estimator": "rloo", "alignment_coef": 2.0, "log_rollouts": True},
        logging_steps=1,
    )
    out = _train(tmp_path, "single", config)
    captured = capsys.readouterr()
    # The console wraps long lines; compare with whitespace collapsed.
    assert "falls back to reinforce" in " ".join((captured.out + captured.err).split())

    for line in _read_jsonl(out / "metrics.jsonl"):
        assert line["ebft/diversity"] == 0.0
        assert math.isfinite(line["ebft/rl_loss"])
    for record in _read_jsonl(out / "rollouts.jsonl"):
        assert len(record["samples"]) == 1
        for block in _blocks(record):
            # No group: no diversity, no baseline; advantage = reward = 2.0 * alignment.
            assert block["diversity"] == 0.0
            assert block["advantage"] == block["reward"]
            assert block["reward"] == pytest.approx(2.0 * block["alignment"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Invariances


@pytest.fixture(scope="module")
def varied_file(tmp_path_factory) -> Path:
    """Documents of different lengths, so a micro-batch of 4 pads where micro-batches of 1 do not."""
    rows = [{"text": text[: 80 + 30 * i]} for i, text in enumerate(_long_texts())]
    return _write_jsonl(tmp_path_factory.mktemp("data") / "varied.jsonl", rows)


def test_accumulation_split_does_not_change_the_run(tmp_path, tiny_model_dir, varied_file):
    def run(name: str, micro: int, accumulation: int) -> Path:
        config = _config(
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
        return _train(tmp_path, name, config)

    one_by_four = run("1x4", 1, 4)
    four_by_one = run("4x1", 4, 1)

    for step in (1, 2):
        lengths = {r["length"] for r in _read_jsonl(four_by_one / "rollouts.jsonl") if r["step"] == step}
        assert len(lengths) > 1, "the documents of a step must differ in length for padding to be exercised"
    moved = _max_abs_diff(_weights(one_by_four), _weights(tiny_model_dir))
    assert moved > 1e-3, "the run must move the weights for the comparison to mean anything"
    assert _max_abs_diff(_weights(one_by_four), _weights(four_by_one)) <= 1e-5

    metrics_a = _read_jsonl(one_by_four / "metrics.jsonl")
    metrics_b = _read_jsonl(four_by_one / "metrics.jsonl")
    assert len(metrics_a) == len(metrics_b) == 2
    for a, b in zip(metrics_a, metrics_b, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - set(TIMING_METRICS):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert _sampled(one_by_four) == _sampled(four_by_one)


@pytest.fixture(scope="module")
def no_checkpointing_run(tmp_path_factory, tiny_model_dir, text_file) -> Path:
    tmp = tmp_path_factory.mktemp("gc")
    return _train(tmp, "plain", _gc_config(tiny_model_dir, text_file, gradient_checkpointing=False))


def _gc_config(model_dir, data, **top) -> dict:
    return _config(model_dir, data, optimizer="sgd", learning_rate=1.0, max_grad_norm=None, logging_steps=1, **top)


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
    out = _train(tmp_path, "checkpointed", config)
    plain = [line["grad_norm"] for line in _read_jsonl(no_checkpointing_run / "metrics.jsonl")]
    checkpointed = [line["grad_norm"] for line in _read_jsonl(out / "metrics.jsonl")]
    assert checkpointed == pytest.approx(plain, rel=1e-5)
    assert _max_abs_diff(_weights(out), _weights(no_checkpointing_run)) <= 1e-5


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
    config = _config(
        tiny_model_dir,
        text_file,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        learning_rate=lr,
        logging_steps=1,
        save_steps=1,
        **extra,
    )
    out = _train(tmp_path, "opt", config)

    # The logged rate is the one the step used.
    logged = [line["learning_rate"] for line in _read_jsonl(out / "metrics.jsonl")]
    assert logged == pytest.approx([lr * f for f in factors], rel=1e-9, abs=0.0)

    base, after_one = _weights(tiny_model_dir), _weights(out / "checkpoint-1")
    if factors[0] == 0.0:
        assert _max_abs_diff(after_one, base) == 0.0, "a step at learning rate 0 must not move the weights"
    else:
        assert _max_abs_diff(after_one, base) > 0.0
    if optimizer.startswith("adamw"):
        # First Adam step, bias-corrected: m = g, v = g^2, so each weight moves by lr * g / (|g| + 1e-8),
        # i.e. by lr = 1e-3 wherever its gradient is not ~0 (weight_decay 0).
        moves = torch.cat([(after_one[k].double() - base[k].double()).abs().flatten() for k in base])
        assert float(moves.max()) == pytest.approx(lr, rel=1e-3)
        assert float(moves.max()) <= lr * (1 + 1e-3)
    assert _max_abs_diff(_weights(out), after_one) > 0.0


# ---------------------------------------------------------------------------------------------
# CLI


def test_validate_prints_the_resolved_config(tmp_path, text_file, capsys):
    # A hub id that cannot be reached here: validate must not touch the model.
    config = _config("meta-llama/Llama-3.2-1B", text_file)
    path = _write_config(tmp_path, "v", config)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == load_config(path).model_dump()
    assert not (tmp_path / "v").exists(), "validate must not create output_dir"


def test_validate_keeps_warnings_out_of_the_yaml(tmp_path, text_file, capsys):
    config = _config("meta-llama/Llama-3.2-1B", text_file, flash_attention=True)
    path = _write_config(tmp_path, "v", config)
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
    config = _config(tiny_model_dir, text_file, ebft={"strid": 4})
    path = _write_config(tmp_path, "bad", config)
    for command in ("validate", "train"):
        err = _fails(capsys, [command, str(path)])
        assert "ebft.strid" in err and "did you mean 'stride'?" in err
    assert not (tmp_path / "bad").exists()


def test_invalid_override_is_an_error(tmp_path, tiny_model_dir, text_file, capsys):
    path = _write_config(tmp_path, "ok", _config(tiny_model_dir, text_file))
    err = _fails(capsys, ["train", str(path), "--ebft.stride=0"])
    assert "ebft.stride: must be >= 1 (got 0)" in err


def test_missing_dataset_file_is_an_error(tmp_path, tiny_model_dir, capsys):
    missing = tmp_path / "nowhere" / "train.jsonl"
    path = _write_config(tmp_path, "nodata", _config(tiny_model_dir, missing))
    err = _fails(capsys, ["train", str(path)])
    assert str(missing) in err

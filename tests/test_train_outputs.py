"""Strided training end to end through ``ebft.cli.main`` on the tiny local model: what a run leaves behind
(metrics, checkpoints, loadable models, the resolved config) and the rollout log checked against the logged
loss and the reward formulas.

Layout arithmetic used below: with ``pack: false`` every stdlib document (thousands of tokens) is cut
to exactly ``sequence_len`` tokens, so every row has the same, hand-computable anchors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from config_builders import load_weights, max_abs_diff, read_jsonl, strided_config, train_run, write_run_config
from conftest import long_texts, write_jsonl
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


ROLLOUT_KEYS = {"step", "document", "input_ids", "input_text", "length", "anchors", "samples"}
BLOCK_KEYS = {"tokens", "text", "logprobs", "alignment", "diversity", "reward", "advantage"}


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    """Prompt/completion rows: a module's first line asks, the next lines answer."""
    rows = []
    for text in long_texts():
        lines = text.splitlines()
        rows.append({"input": lines[0][:60], "output": "\n".join(lines[1:25])})
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)


def _fixed_rows(data: Path) -> list[dict]:
    """One row per document, cut to sequence_len (see the module docstring)."""
    return [{"path": str(data), "type": "ebft_pretrain.transform", "pack": False}]


def _blocks(record: dict):
    """Every (sample, block) entry of one rollout record."""
    return [block for sample in record["samples"] for block in sample]


# ---------------------------------------------------------------------------------------------
# What a run leaves in output_dir


def test_full_finetune_outputs(tmp_path, tiny_model_dir, text_file):
    config = strided_config(
        tiny_model_dir,
        text_file,
        datasets=_fixed_rows(text_file),
        ebft={"ce_coef": 0.05, "rl_coef": 0.5},
        max_steps=4,
        logging_steps=2,
        save_steps=2,
    )
    path = write_run_config(tmp_path, "run", config)
    assert main(["train", str(path)]) == 0
    out = tmp_path / "run"

    lines = read_jsonl(out / "metrics.jsonl")
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

    base = load_weights(tiny_model_dir)
    for directory in (out, out / "checkpoint-2"):
        model = AutoModelForCausalLM.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert len(tokenizer) == model.config.vocab_size
        loaded = {k: v for k, v in model.state_dict().items() if k in base}
        assert max_abs_diff(loaded, load_weights(directory)) == 0.0
        assert max_abs_diff(loaded, base) > 0.0, "training did not change the weights"
        # The saved config is what users load for inference: the KV cache stays on, as in the base model.
        assert json.loads((directory / "config.json").read_text())["use_cache"] is True
        assert model.config.use_cache is True
    assert json.loads((tiny_model_dir / "config.json").read_text())["use_cache"] is True
    assert max_abs_diff(load_weights(out), load_weights(out / "checkpoint-2")) > 0.0

    assert load_config(out / "config.yaml") == load_config(path)


def test_lora_outputs(tmp_path, tiny_model_dir, text_file):
    config = strided_config(
        tiny_model_dir, text_file, adapter="lora", lora_r=4, lora_target_linear=True, save_steps=1, logging_steps=1
    )
    out = train_run(tmp_path, "lora", config)

    assert [line["step"] for line in read_jsonl(out / "metrics.jsonl")] == [1, 2]
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
    config = strided_config(
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
    out = train_run(tmp_path, "rollouts", config)
    n, g = 4, 4
    metrics = {line["step"]: line for line in read_jsonl(out / "metrics.jsonl")}
    records = read_jsonl(out / "rollouts.jsonl")

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
    config = strided_config(
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
    out = train_run(tmp_path, "pairs", config)

    # The row a record came from, rebuilt as the transform documents it: prompt ids, then completion + EOS.
    prompt_length = {}
    for row in read_jsonl(pair_file):
        prompt = tiny_tokenizer(row["input"])["input_ids"]
        completion = tiny_tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        prompt_length[tuple((prompt + completion + [tiny_tokenizer.eos_token_id])[:96])] = len(prompt)
    records = read_jsonl(out / "rollouts.jsonl")
    assert len(records) == 2 * 2  # 2 documents in each of 2 steps
    for record in records:
        length = record["length"]
        p = prompt_length[tuple(record["input_ids"][:length])]
        # docs/design.md §4.1: a = max(context_length, prompt_length + min_completion_prefix)
        first = max(context, p + prefix)
        count = (length - g - first) // stride + 1  # every c_k = first + k * stride with c_k + g <= length
        assert record["anchors"] == [first + k * stride for k in range(count)]


def test_single_sample_falls_back_to_reinforce(tmp_path, tiny_model_dir, text_file, capsys):
    config = strided_config(
        tiny_model_dir,
        text_file,
        ebft={"n_samples_per_prompt": 1, "advantage_estimator": "rloo", "alignment_coef": 2.0, "log_rollouts": True},
        logging_steps=1,
    )
    out = train_run(tmp_path, "single", config)
    captured = capsys.readouterr()
    # The console wraps long lines; compare with whitespace collapsed.
    assert "falls back to reinforce" in " ".join((captured.out + captured.err).split())

    for line in read_jsonl(out / "metrics.jsonl"):
        assert line["ebft/diversity"] == 0.0
        assert math.isfinite(line["ebft/rl_loss"])
    for record in read_jsonl(out / "rollouts.jsonl"):
        assert len(record["samples"]) == 1
        for block in _blocks(record):
            # No group: no diversity, no baseline; advantage = reward = 2.0 * alignment.
            assert block["diversity"] == 0.0
            assert block["advantage"] == block["reward"]
            assert block["reward"] == pytest.approx(2.0 * block["alignment"], abs=1e-6)

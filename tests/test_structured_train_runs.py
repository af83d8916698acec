"""Structured-mode training end to end through ``ebft.cli.main`` with transformers generate on the tiny model:
every structured transform trains and logs, the logged rewards and advantages agree with the completion
log, and every loss type, reward scaling, greedy sampling and LoRA run.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

import pytest
from config_builders import load_weights, max_abs_diff, read_jsonl, structured_config, train_run
from safetensors.torch import load_file

LOGGED = ("ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward", "completions/mean_length", "entropy")
RECORD_KEYS = {"prompt", "completion", "ground_truth", "reward", "advantage"}


def _by_step(records: list[dict]) -> dict[int, list[dict]]:
    out = defaultdict(list)
    for r in records:
        out[r["step"]].append(r)
    return out


def _check_run(out: Path, steps: int, prompts_per_step: int, G: int, console: str) -> list[dict]:
    """What every structured run must leave behind; returns the completion records."""
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        for key in LOGGED:
            assert key in m and math.isfinite(m[key]), (key, m.get(key))
        assert m["completions/mean_length"] > 0
    records = read_jsonl(out / "completions.jsonl")
    by_step = _by_step(records)
    assert sorted(by_step) == list(range(1, steps + 1))  # num_iterations 1: a fresh batch every step
    for step, rows in by_step.items():
        assert len(rows) == prompts_per_step * G
        assert all(set(r) >= RECORD_KEYS for r in rows)
        assert all(math.isfinite(r["reward"]) and math.isfinite(r["advantage"]) for r in rows)
        # The logged reward is the mean over the step's completions.
        line = metrics[step - 1]
        assert line["ebft/reward"] == pytest.approx(statistics.mean(r["reward"] for r in rows), abs=1e-5)
        assert line["ebft/alignment"] == pytest.approx(statistics.mean(r["alignment"] for r in rows), abs=1e-5)
    assert "ebft reward | align" in console
    return records


def _groups(rows: list[dict], G: int) -> list[list[dict]]:
    rows = sorted(rows, key=lambda r: r["sample"])
    return [rows[i : i + G] for i in range(0, len(rows), G)]


# ---------------------------------------------------------------------------------------------
# Every transform, end to end


@pytest.mark.parametrize(
    "transform, data",
    [
        ("ebft_opencode.transform", "pairs.jsonl"),
        ("ebft_chat_multiturn.transform", "chat.jsonl"),
        ("ebft_chat_multiturn.transform_last_turn", "chat.jsonl"),
        ("ebft_chat_multiturn.transform_all_turns", "chat.jsonl"),
        ("ebft_reasoning.transform", "reasoning.jsonl"),
        ("ebft_reasoning.transform_split_thinking", "reasoning.jsonl"),
        ("ebft_reasoning.transform_answer_only", "reasoning.jsonl"),
    ],
)
def test_every_transform_trains(tmp_path, tiny_model_dir, data_dir, capsys, transform, data):
    config = structured_config(tiny_model_dir, data_dir / data, transform)
    out = train_run(tmp_path, "run", config)
    captured = capsys.readouterr()
    records = _check_run(out, steps=2, prompts_per_step=2, G=4, console=captured.out + captured.err)

    # scale_rewards group: advantage = (r - group mean) / (unbiased group std + 1e-4)
    for rows in _by_step(records).values():
        for group in _groups(rows, 4):
            assert len({r["ground_truth"] for r in group}) == 1  # one prompt per group
            r = [x["reward"] for x in group]
            mean, std = statistics.mean(r), statistics.stdev(r)
            for x in group:
                assert x["advantage"] == pytest.approx((x["reward"] - mean) / (std + 1e-4), abs=1e-4)

    gts = {r["ground_truth"] for r in records}
    if transform == "ebft_reasoning.transform":
        assert all(g.startswith("<think>") for g in gts)
    elif transform == "ebft_reasoning.transform_split_thinking":
        assert all(g.startswith("<think>\n") and "\n</think>\n\n" in g for g in gts)
    elif transform == "ebft_reasoning.transform_answer_only":
        assert not any("<think>" in g or "</think>" in g for g in gts)
    if transform == "ebft_chat_multiturn.transform":
        # A rolled-out conversation holds its own row's later user turns and no other row's.
        chats = [row["messages"] for row in read_jsonl(data_dir / data)]
        multi = 0
        for r in records:
            (row,) = [m for m in chats if any(x["content"] in r["prompt"] for x in m if x["role"] == "user")]
            later = [
                m["content"] for m in row[[m["role"] for m in row].index("assistant") + 1 :] if m["role"] == "user"
            ]
            assert all(f"<|user|>\n{text}</s>" in r["completion"] for text in later)
            others = [x["content"] for m in chats if m is not row for x in m if x["role"] == "user"]
            assert not any(f"<|user|>\n{text}</s>" in r["completion"] for text in others)
            multi += bool(later)
        assert multi > 0, "no multi-turn row was rolled out"


def test_custom_transform_next_to_the_config(tmp_path, tiny_model_dir, data_dir, capsys):
    (tmp_path / "my_structured_rows.py").write_text(
        "def transform(cfg, **kwargs):\n"
        "    def fn(example, tokenizer=None):\n"
        "        return {'prompt': 'Q: ' + example['question'] + '\\nA:', 'ground_truth': example['answer']}\n"
        "    return fn, {'remove_columns': '__all__'}\n",
        encoding="utf-8",
    )
    config = structured_config(tiny_model_dir, data_dir / "custom.jsonl", "my_structured_rows.transform")
    out = train_run(tmp_path, "custom", config)
    captured = capsys.readouterr()
    records = _check_run(out, steps=2, prompts_per_step=2, G=4, console=captured.out + captured.err)
    answers = {row["answer"] for row in read_jsonl(data_dir / "custom.jsonl")}
    assert {r["ground_truth"] for r in records} <= answers
    assert all(r["prompt"].startswith("Q: ") and r["prompt"].endswith("\nA:") for r in records)  # no chat template


# ---------------------------------------------------------------------------------------------
# Loss types, reward scaling, greedy sampling


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo"])
def test_other_loss_types_run(tmp_path, tiny_model_dir, data_dir, capsys, loss_type):
    """bnpo and dr_grpo train, and the logged policy loss is the one their definition gives."""
    out = train_run(
        tmp_path, loss_type, structured_config(tiny_model_dir, data_dir / "pairs.jsonl", trl={"loss_type": loss_type})
    )
    captured = capsys.readouterr()
    records = _check_run(out, steps=2, prompts_per_step=2, G=4, console=captured.out + captured.err)
    assert max_abs_diff(load_weights(out), load_file(tiny_model_dir / "model.safetensors")) > 1e-4
    # On-policy (num_iterations 1) every ratio is 1, so a loss token of completion i costs -A_i, and completion
    # i has completion_tokens loss tokens. A step is 8 completions in 2 micro-batches of 4 (samples 0-3, 4-7).
    for line, rows in zip(read_jsonl(out / "metrics.jsonl"), _by_step(records).values(), strict=True):
        rows = sorted(rows, key=lambda r: r["sample"])
        assert len({r["completion_tokens"] for r in rows}) > 1  # lengths differ, so the token weighting matters
        cost = [-r["advantage"] * r["completion_tokens"] for r in rows]
        if loss_type == "dr_grpo":  # token sum / (completions x max_completion_length 12)
            expected = sum(cost) / (8 * 12)
        else:  # bnpo: mean over the 2 micro-batches of each micro-batch's token mean
            tokens = [r["completion_tokens"] for r in rows]
            expected = (sum(cost[:4]) / sum(tokens[:4]) + sum(cost[4:]) / sum(tokens[4:])) / 2
        assert abs(expected) > 1e-3
        assert line["ebft/rl_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_scale_rewards_batch(tmp_path, tiny_model_dir, data_dir, capsys):
    config = structured_config(
        tiny_model_dir, data_dir / "pairs.jsonl", trl={"scale_rewards": "batch"}, ebft={"use_whitening": False}
    )
    out = train_run(tmp_path, "batch", config)
    captured = capsys.readouterr()
    records = _check_run(out, steps=2, prompts_per_step=2, G=4, console=captured.out + captured.err)
    for rows in _by_step(records).values():
        # advantage = (r - group mean) / (unbiased std of all the step's rewards + 1e-4)
        spread = statistics.stdev(r["reward"] for r in rows)
        for group in _groups(rows, 4):
            mean = statistics.mean(r["reward"] for r in group)
            for r in group:
                assert r["advantage"] == pytest.approx((r["reward"] - mean) / (spread + 1e-4), abs=1e-4)
        # without whitening: reward = 2 cos - 2/(n-1) sum of dots (coefficients 1)
        for r in rows:
            assert r["reward"] == pytest.approx(r["alignment"] - r["diversity"], abs=1e-5)


def test_greedy_sampling_runs(tmp_path, tiny_model_dir, data_dir, capsys):
    """temperature 0: the 4 completions of a prompt are the same, so every advantage is 0."""
    config = structured_config(
        tiny_model_dir,
        data_dir / "pairs.jsonl",
        trl={"temperature": 0.0},
        ebft={"ce_coef": 0.0, "use_whitening": False},
    )
    out = train_run(tmp_path, "greedy", config)
    captured = capsys.readouterr()
    records = _check_run(out, steps=2, prompts_per_step=2, G=4, console=captured.out + captured.err)
    for rows in _by_step(records).values():
        for group in _groups(rows, 4):
            assert len({r["completion"] for r in group}) == 1
            assert all(r["advantage"] == 0.0 for r in group)


# ---------------------------------------------------------------------------------------------
# Completion printing and LoRA


@pytest.mark.parametrize("count, printed", [(None, 8), (3, 3), (0, 0)])
def test_log_completions_prints_completions(tmp_path, tiny_model_dir, data_dir, capsys, count, printed):
    """trl.num_completions_to_print: null prints every completion of the step (8 = 2 prompts x 4)."""
    trl = {"num_completions_to_print": count} if count is not None else {}
    train_run(tmp_path, "printed", structured_config(tiny_model_dir, data_dir / "pairs.jsonl", trl=trl, max_steps=1))
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.startswith("[sample ")]
    assert len(lines) == printed
    assert [line.split("]")[0] for line in lines] == [f"[sample {i}" for i in range(printed)]


def test_lora_run_trains_the_adapter_only(tmp_path, tiny_model_dir, data_dir, capsys):
    """With LoRA the feature network is the policy's own base weights (adapter disabled)."""
    config = structured_config(
        tiny_model_dir,
        data_dir / "chat.jsonl",
        "ebft_chat_multiturn.transform",
        adapter="lora",
        lora_target_linear=True,
    )
    out = train_run(tmp_path, "lora", config)
    captured = capsys.readouterr()
    _check_run(out, steps=2, prompts_per_step=2, G=4, console=captured.out + captured.err)
    assert not (out / "model.safetensors").exists()
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)  # nothing but LoRA matrices saved
    assert any(float(w.abs().max()) > 0 for k, w in adapter.items() if "lora_B" in k)  # B starts at zero

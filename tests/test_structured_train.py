"""Structured-mode training end to end through ``ebft.cli.main`` with transformers generate on the tiny model.

Every structured transform trains and logs; the logged rewards and advantages agree with the completion
log; a resumed ``num_iterations: 2`` run reproduces the uninterrupted one (the saved rollout buffer);
gradient accumulation does not change the update; the CE term is the teacher-forced NLL of the
ground truth; every loss type and reward scaling runs.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
import threading
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml
from conftest import stdlib_texts
from safetensors.torch import load_file

from ebft.cli import main
from ebft.structured.rollout import Completion

LOGGED = ("ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward", "completions/mean_length", "entropy")
RECORD_KEYS = {"prompt", "completion", "ground_truth", "reward", "advantage"}
TIMING = ("tokens_per_second", "step_seconds", "peak_memory_mib")


# ---------------------------------------------------------------------------------------------
# Data and helpers


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _snippets() -> list[tuple[str, str]]:
    """(first line, a few following lines) of stdlib modules: short questions and answers."""
    out = []
    for text in stdlib_texts(24):
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) >= 6:
            out.append((lines[0][:50], "\n".join(lines[1:4])[:120]))
    return out[:12]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("structured-data")
    pairs = _snippets()
    _write_jsonl(d / "pairs.jsonl", [{"input": q, "output": a} for q, a in pairs])

    def u(text):
        return {"role": "user", "content": text}

    def a(text):
        return {"role": "assistant", "content": text}

    # Conversations of different lengths; every user message is unique (marker words) so that a rolled-out
    # conversation shows which row it belongs to.
    chats = []
    for i, (q, ans) in enumerate(pairs[:8]):
        turns = i % 3  # 0, 1 or 2 further exchanges
        messages = [u(f"q{i}a {q}"), a(ans[:60])]
        for t in range(turns):
            messages += [u(f"q{i}{'bc'[t]} more"), a(ans[-40:])]
        if i % 4 == 1:
            messages.insert(0, {"role": "system", "content": "be short"})
        chats.append({"messages": messages})
    _write_jsonl(d / "chat.jsonl", chats)

    reasoning = []
    for i, (q, ans) in enumerate(pairs[:8]):
        messages = [u(f"why {q}"), a(f"<think>\nthe line is {q[:20]}\n</think>\n\n{ans[:50]}")]
        if i % 2:
            messages = [u("hello"), a("<think>greet</think>hi"), *messages]
        reasoning.append({"messages": messages})
    _write_jsonl(d / "reasoning.jsonl", reasoning)

    _write_jsonl(d / "custom.jsonl", [{"question": q, "answer": ans} for q, ans in pairs])
    return d


def _config(model_dir: Path, data: Path, transform: str = "ebft_opencode.transform", **top) -> dict:
    """A small structured config; ``trl`` and ``ebft`` are merged, other keyword arguments replace keys."""
    trl = {
        "num_generations": 4,
        "max_completion_length": 12,
        "temperature": 1.0,
        "log_completions": True,
        # 30 ordinary byte tokens also stop a completion (the random model hardly ever says EOS), so
        # completions of one step have different lengths and some finish.
        "generation_kwargs": {"stop_token_ids": list(range(100, 130))},
    }
    trl.update(top.pop("trl", {}))
    ebft = {"mode": "structured", "use_whitening": True, "ce_coef": 0.03, "feature_layers": [0.5, 1.0]}
    ebft.update(top.pop("ebft", {}))
    config = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": ebft,
        "trl": trl,
        "datasets": [{"path": str(data), "type": transform}],
        "sequence_len": 160,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "bf16": False,
        "seed": 0,
    }
    config.update(top)
    return config


def _write_config(directory: Path, name: str, config: dict) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(directory / name)}), encoding="utf-8")
    return path


def _train(directory: Path, name: str, config: dict, *overrides: str) -> Path:
    path = _write_config(directory, name, config)
    assert main(["train", str(path), *overrides]) == 0
    return directory / name


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _by_step(records: list[dict]) -> dict[int, list[dict]]:
    out = defaultdict(list)
    for r in records:
        out[r["step"]].append(r)
    return out


def _check_run(out: Path, steps: int, prompts_per_step: int, G: int, console: str) -> list[dict]:
    """What every structured run must leave behind; returns the completion records."""
    metrics = _read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        for key in LOGGED:
            assert key in m and math.isfinite(m[key]), (key, m.get(key))
        assert m["completions/mean_length"] > 0
    records = _read_jsonl(out / "completions.jsonl")
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
    config = _config(tiny_model_dir, data_dir / data, transform)
    out = _train(tmp_path, "run", config)
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
        chats = [row["messages"] for row in _read_jsonl(data_dir / data)]
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
    config = _config(tiny_model_dir, data_dir / "custom.jsonl", "my_structured_rows.transform")
    out = _train(tmp_path, "custom", config)
    captured = capsys.readouterr()
    records = _check_run(out, steps=2, prompts_per_step=2, G=4, console=captured.out + captured.err)
    answers = {row["answer"] for row in _read_jsonl(data_dir / "custom.jsonl")}
    assert {r["ground_truth"] for r in records} <= answers
    assert all(r["prompt"].startswith("Q: ") and r["prompt"].endswith("\nA:") for r in records)  # no chat template


# ---------------------------------------------------------------------------------------------
# Resume with a rollout batch in flight


def test_resume_with_num_iterations_reproduces_the_run(tmp_path, tiny_model_dir, data_dir):
    config = _config(
        tiny_model_dir,
        data_dir / "pairs.jsonl",
        trl={"num_iterations": 2, "epsilon": 0.05},  # a tight clip so step 2 and 4 clip some tokens
        max_steps=4,
        save_steps=1,
        learning_rate=3e-3,
    )
    full = _train(tmp_path, "full", config)
    metrics = _read_jsonl(full / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # Steps 1-2 train on rollout batch 0, steps 3-4 on batch 1; records are logged when a batch is made.
    assert sorted({r["step"] for r in _read_jsonl(full / "completions.jsonl")}) == [1, 3]
    assert metrics[0]["ebft/reward"] == metrics[1]["ebft/reward"] != metrics[2]["ebft/reward"]
    assert metrics[1]["clip_ratio/low_mean"] + metrics[1]["clip_ratio/high_mean"] > 0  # step 2 is off-policy
    assert (full / "checkpoint-3" / "rollout_buffer_0.pt").exists()

    path = _write_config(tmp_path, "full", config)
    for at in (3, 1, 2):  # mid-batch (reuses the saved buffer) and at a batch boundary
        part = tmp_path / f"part{at}"
        part.mkdir()
        shutil.copytree(full / f"checkpoint-{at}", part / f"checkpoint-{at}")
        assert main(["train", str(path), f"--output_dir={part}", "--resume_from_checkpoint=latest"]) == 0
        resumed = _read_jsonl(part / "metrics.jsonl")
        assert [m["step"] for m in resumed] == list(range(at + 1, 5))
        for a, b in zip(metrics[at:], resumed, strict=True):
            for key in a:
                if key not in TIMING:
                    assert a[key] == b[key], (at, a["step"], key)
        assert _max_diff(_weights(full), _weights(part)) == 0.0


# ---------------------------------------------------------------------------------------------
# Gradient accumulation, CE, loss types, reward scaling


def test_accumulation_does_not_change_the_update(tmp_path, tiny_model_dir, data_dir):
    """4 completions x 2 micro-batches == 8 completions x 1 (docs/design.md §4, §10): same rollouts, same update.

    num_iterations 2 over 2 steps: step 1 is on-policy, step 2 trains on the stored log-probs. SGD, because
    the two layouts' gradients agree only to float rounding (~1e-10 absolute), and AdamW divides a gradient
    element near adam_epsilon (1e-8) by about its own size, which turns that rounding into weight
    differences of ~1e-5 after two steps at lr 1e-3; SGD moves the weights by lr x gradient and shows the
    gradients themselves agree.
    """
    final = {}
    for loss_type in ("grpo", "dapo"):
        config = _config(
            tiny_model_dir,
            data_dir / "pairs.jsonl",
            trl={"loss_type": loss_type, "num_iterations": 2},
            ebft={"ce_coef": 0.1},
            optimizer="sgd",
            learning_rate=0.05,
        )
        split = _train(tmp_path, f"split-{loss_type}", config)
        whole = _train(
            tmp_path, f"whole-{loss_type}", {**config, "micro_batch_size": 8, "gradient_accumulation_steps": 1}
        )
        records = _read_jsonl(split / "completions.jsonl")
        assert records == _read_jsonl(whole / "completions.jsonl")
        # Completions of different lengths, so grpo (per-completion means) and dapo (token mean) differ.
        assert len({r["completion_tokens"] for r in records}) > 1
        for a, b in zip(_read_jsonl(split / "metrics.jsonl"), _read_jsonl(whole / "metrics.jsonl"), strict=True):
            for key in ("loss", "ebft/rl_loss", "ebft/ce_loss", "entropy", "grad_norm", "clip_ratio/low_mean"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        base = load_file(tiny_model_dir / "model.safetensors")
        assert _max_diff(_weights(split), base) > 1e-3  # the steps did something
        assert _max_diff(_weights(split), _weights(whole)) < 1e-6
        final[loss_type] = _weights(split)
    assert _max_diff(final["grpo"], final["dapo"]) > 1e-5  # the loss type matters


def _step_one_ce(tokenizer, data: Path, records: list[dict]) -> float:
    """Mean NLL of ground truth + EOS given the chat-rendered prompt, over step 1's prompts, by plain forwards
    of the base model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tokenizer.name_or_path).float().eval()
    inputs = {row["output"]: row["input"] for row in _read_jsonl(data)}
    nll, count = 0.0, 0
    for gt in sorted({r["ground_truth"] for r in records if r["step"] == 1}):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": inputs[gt]}], add_generation_prompt=True, tokenize=False
        )
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        target = tokenizer(gt, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        nll -= float(logp[len(prompt) - 1 :].sum())
        count += len(target)
    return nll / count


def test_ce_coef_adds_the_ground_truth_nll(tmp_path, tiny_model_dir, tiny_tokenizer, data_dir):
    data = data_dir / "pairs.jsonl"
    with_ce = _train(tmp_path, "ce", _config(tiny_model_dir, data, ebft={"ce_coef": 0.5}))
    without = _train(tmp_path, "no_ce", _config(tiny_model_dir, data, ebft={"ce_coef": 0.0}))
    m_ce, m_none = _read_jsonl(with_ce / "metrics.jsonl"), _read_jsonl(without / "metrics.jsonl")
    assert all("ebft/ce_loss" in m and math.isfinite(m["ebft/ce_loss"]) for m in m_ce)
    assert not any("ebft/ce_loss" in m for m in m_none)
    for m in m_ce:  # loss = rl_coef * rl + ce_coef * ce, logging every step
        assert m["loss"] == pytest.approx(m["ebft/rl_loss"] + 0.5 * m["ebft/ce_loss"], rel=1e-5)
    # Step 1 starts from the same weights: same rollouts and rewards, and its CE is the base model's NLL.
    records = _read_jsonl(with_ce / "completions.jsonl")
    assert [r for r in records if r["step"] == 1] == [
        r for r in _read_jsonl(without / "completions.jsonl") if r["step"] == 1
    ]
    assert m_ce[0]["ebft/reward"] == m_none[0]["ebft/reward"]
    assert m_ce[0]["ebft/ce_loss"] == pytest.approx(_step_one_ce(tiny_tokenizer, data, records), rel=1e-4)
    assert _max_diff(_weights(with_ce), _weights(without)) > 1e-4  # CE changes the update


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo"])
def test_other_loss_types_run(tmp_path, tiny_model_dir, data_dir, capsys, loss_type):
    """bnpo and dr_grpo train, and the logged policy loss is the one their definition gives."""
    out = _train(tmp_path, loss_type, _config(tiny_model_dir, data_dir / "pairs.jsonl", trl={"loss_type": loss_type}))
    captured = capsys.readouterr()
    records = _check_run(out, steps=2, prompts_per_step=2, G=4, console=captured.out + captured.err)
    assert _max_diff(_weights(out), load_file(tiny_model_dir / "model.safetensors")) > 1e-4
    # On-policy (num_iterations 1) every ratio is 1, so a loss token of completion i costs -A_i, and completion
    # i has completion_tokens loss tokens. A step is 8 completions in 2 micro-batches of 4 (samples 0-3, 4-7).
    for line, rows in zip(_read_jsonl(out / "metrics.jsonl"), _by_step(records).values(), strict=True):
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
    config = _config(
        tiny_model_dir, data_dir / "pairs.jsonl", trl={"scale_rewards": "batch"}, ebft={"use_whitening": False}
    )
    out = _train(tmp_path, "batch", config)
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
    config = _config(
        tiny_model_dir,
        data_dir / "pairs.jsonl",
        trl={"temperature": 0.0},
        ebft={"ce_coef": 0.0, "use_whitening": False},
    )
    out = _train(tmp_path, "greedy", config)
    captured = capsys.readouterr()
    records = _check_run(out, steps=2, prompts_per_step=2, G=4, console=captured.out + captured.err)
    for rows in _by_step(records).values():
        for group in _groups(rows, 4):
            assert len({r["completion"] for r in group}) == 1
            assert all(r["advantage"] == 0.0 for r in group)


# ---------------------------------------------------------------------------------------------
# The runner with a rollout server that prefetches (vLLM's path, with a stand-in backend)


class _SeededBackend:
    """Completions that are a function of (prompt, seed, sample) only, with sampler log-probs, like a
    server; records the thread of every call."""

    def __init__(self, eos: int):
        self.eos, self.calls, self.lock = eos, [], threading.Lock()

    def generate(self, prompts, n, max_tokens, seeds):
        with self.lock:
            self.calls.append((threading.current_thread() is threading.main_thread(), list(seeds)))
        out = []
        for prompt, cap, seed in zip(prompts, max_tokens, seeds, strict=True):
            group = []
            for j in range(n):
                r = random.Random(f"{seed}-{j}-{sum(prompt)}-{len(prompt)}")
                ids = [r.randrange(7, 300) for _ in range(r.randint(1, cap))]
                finished = len(ids) < cap and r.random() < 0.7
                ids += [self.eos] if finished else []
                group.append(Completion(tuple(ids), finished, tuple(-3 * r.random() for _ in ids)))
            out.append(group)
        return out

    def sync(self, model, step):
        pass

    def close(self):
        pass


def _runner(tmp_path: Path, model_dir: Path, data: Path, async_prefetch: bool):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ebft.config import load_config
    from ebft.data.structured import load_structured_datasets
    from ebft.modeling.feature_network import feature_network_for
    from ebft.structured.runner import StructuredRunner

    config = _config(
        model_dir,
        data,
        adapter="lora",  # what use_vllm requires; the runner itself trains whatever model it is given
        lora_target_linear=True,
        trl={
            "use_vllm": True,
            "vllm_lora_sync": True,
            "async_prefetch": async_prefetch,
            "mask_truncated_completions": True,
        },
    )
    cfg = load_config(_write_config(tmp_path, f"runner-{async_prefetch}", config))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    model.train()
    backend = _SeededBackend(tokenizer.eos_token_id)
    runner = StructuredRunner(
        cfg,
        model=model,
        features=feature_network_for(cfg, model, torch.device("cpu")),
        tokenizer=tokenizer,
        data=load_structured_datasets(cfg, tokenizer),
        accelerator=Accelerator(cpu=True),
        autocast_dtype=None,
        backend=backend,
    )
    return runner, backend


def test_async_prefetch_gives_the_same_rollout_batches(tmp_path, tiny_model_dir, data_dir):
    from ebft.train.checkpoint import TrainState

    outputs, states = {}, {}
    for prefetch in (False, True):
        runner, backend = _runner(tmp_path, tiny_model_dir, data_dir / "pairs.jsonl", prefetch)
        state = TrainState()
        runner.start(state)
        outputs[prefetch] = []
        try:
            for step in (1, 2, 3):
                outputs[prefetch].append(runner.run(step, state))
                state.step = step
                if prefetch and step < runner.total_steps():
                    # The next batch was submitted during this step, off the main thread.
                    generation, _, future = runner._prefetched
                    assert generation == step
                    future.result()
                    assert backend.calls[-1][0] is False
                elif prefetch:  # the run's last batch: nothing left to prefetch
                    assert runner._prefetched is None
        finally:
            runner.close()
        states[prefetch] = state.data_position
        first_turn_calls = [seeds for _, seeds in backend.calls]
        outputs[prefetch, "calls"] = first_turn_calls
    assert states[False] == states[True] == 3  # batches consumed, not counting the prefetched one
    # Same seeds in the same order, and no batch generated beyond the run's last step.
    assert outputs[True, "calls"] == outputs[False, "calls"]
    for sync, pre in zip(outputs[False], outputs[True], strict=True):
        assert sync.records == pre.records
        assert sync.stats == pre.stats
    # vLLM-style log-probs came back, so the importance weights were applied (to finished completions only).
    assert all(out.stats.is_tokens > 0 for out in outputs[True])


@pytest.mark.parametrize("count, printed", [(None, 8), (3, 3), (0, 0)])
def test_log_completions_prints_completions(tmp_path, tiny_model_dir, data_dir, capsys, count, printed):
    """trl.num_completions_to_print: null prints every completion of the step (8 = 2 prompts x 4)."""
    trl = {"num_completions_to_print": count} if count is not None else {}
    _train(tmp_path, "printed", _config(tiny_model_dir, data_dir / "pairs.jsonl", trl=trl, max_steps=1))
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.startswith("[sample ")]
    assert len(lines) == printed
    assert [line.split("]")[0] for line in lines] == [f"[sample {i}" for i in range(printed)]


def test_lora_run_trains_the_adapter_only(tmp_path, tiny_model_dir, data_dir, capsys):
    """With LoRA the feature network is the policy's own base weights (adapter disabled)."""
    config = _config(
        tiny_model_dir,
        data_dir / "chat.jsonl",
        "ebft_chat_multiturn.transform",
        adapter="lora",
        lora_target_linear=True,
    )
    out = _train(tmp_path, "lora", config)
    captured = capsys.readouterr()
    _check_run(out, steps=2, prompts_per_step=2, G=4, console=captured.out + captured.err)
    assert not (out / "model.safetensors").exists()
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)  # nothing but LoRA matrices saved
    assert any(float(w.abs().max()) > 0 for k, w in adapter.items() if "lora_B" in k)  # B starts at zero

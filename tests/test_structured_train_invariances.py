"""Structured-mode training end to end through ``ebft.cli.main``: a resumed ``num_iterations: 2`` run
reproduces the uninterrupted one (the saved rollout buffer), gradient accumulation does not change the
update, the CE term is the teacher-forced NLL of the ground truth, and a prefetching rollout server gives
the same rollout batches.
"""

from __future__ import annotations

import math
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch
from config_builders import load_weights, max_abs_diff, read_jsonl, structured_config, train_run, write_run_config
from safetensors.torch import load_file

from ebft.cli import main
from ebft.structured.rollout import Completion

TIMING = ("tokens_per_second", "step_seconds", "peak_memory_mib")


# ---------------------------------------------------------------------------------------------
# Resume with a rollout batch in flight


def test_resume_with_num_iterations_reproduces_the_run(tmp_path, tiny_model_dir, data_dir):
    config = structured_config(
        tiny_model_dir,
        data_dir / "pairs.jsonl",
        trl={"num_iterations": 2, "epsilon": 0.05},  # a tight clip so step 2 and 4 clip some tokens
        max_steps=4,
        save_steps=1,
        learning_rate=3e-3,
    )
    full = train_run(tmp_path, "full", config)
    metrics = read_jsonl(full / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # Steps 1-2 train on rollout batch 0, steps 3-4 on batch 1; records are logged when a batch is made.
    assert sorted({r["step"] for r in read_jsonl(full / "completions.jsonl")}) == [1, 3]
    assert metrics[0]["ebft/reward"] == metrics[1]["ebft/reward"] != metrics[2]["ebft/reward"]
    assert metrics[1]["clip_ratio/low_mean"] + metrics[1]["clip_ratio/high_mean"] > 0  # step 2 is off-policy
    assert (full / "checkpoint-3" / "rollout_buffer_0.pt").exists()

    path = write_run_config(tmp_path, "full", config)
    for at in (3, 1, 2):  # mid-batch (reuses the saved buffer) and at a batch boundary
        part = tmp_path / f"part{at}"
        part.mkdir()
        shutil.copytree(full / f"checkpoint-{at}", part / f"checkpoint-{at}")
        assert main(["train", str(path), f"--output_dir={part}", "--resume_from_checkpoint=latest"]) == 0
        resumed = read_jsonl(part / "metrics.jsonl")
        assert [m["step"] for m in resumed] == list(range(at + 1, 5))
        for a, b in zip(metrics[at:], resumed, strict=True):
            for key in a:
                if key not in TIMING:
                    assert a[key] == b[key], (at, a["step"], key)
        assert max_abs_diff(load_weights(full), load_weights(part)) == 0.0


# ---------------------------------------------------------------------------------------------
# Gradient accumulation and the CE term


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
        config = structured_config(
            tiny_model_dir,
            data_dir / "pairs.jsonl",
            trl={"loss_type": loss_type, "num_iterations": 2},
            ebft={"ce_coef": 0.1},
            optimizer="sgd",
            learning_rate=0.05,
        )
        split = train_run(tmp_path, f"split-{loss_type}", config)
        whole = train_run(
            tmp_path, f"whole-{loss_type}", {**config, "micro_batch_size": 8, "gradient_accumulation_steps": 1}
        )
        records = read_jsonl(split / "completions.jsonl")
        assert records == read_jsonl(whole / "completions.jsonl")
        # Completions of different lengths, so grpo (per-completion means) and dapo (token mean) differ.
        assert len({r["completion_tokens"] for r in records}) > 1
        for a, b in zip(read_jsonl(split / "metrics.jsonl"), read_jsonl(whole / "metrics.jsonl"), strict=True):
            for key in ("loss", "ebft/rl_loss", "ebft/ce_loss", "entropy", "grad_norm", "clip_ratio/low_mean"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        base = load_file(tiny_model_dir / "model.safetensors")
        assert max_abs_diff(load_weights(split), base) > 1e-3  # the steps did something
        assert max_abs_diff(load_weights(split), load_weights(whole)) < 1e-6
        final[loss_type] = load_weights(split)
    assert max_abs_diff(final["grpo"], final["dapo"]) > 1e-5  # the loss type matters


def _step_one_ce(tokenizer, data: Path, records: list[dict]) -> float:
    """Mean NLL of ground truth + EOS given the chat-rendered prompt, over step 1's prompts, by plain forwards
    of the base model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tokenizer.name_or_path).float().eval()
    inputs = {row["output"]: row["input"] for row in read_jsonl(data)}
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
    with_ce = train_run(tmp_path, "ce", structured_config(tiny_model_dir, data, ebft={"ce_coef": 0.5}))
    without = train_run(tmp_path, "no_ce", structured_config(tiny_model_dir, data, ebft={"ce_coef": 0.0}))
    m_ce, m_none = read_jsonl(with_ce / "metrics.jsonl"), read_jsonl(without / "metrics.jsonl")
    assert all("ebft/ce_loss" in m and math.isfinite(m["ebft/ce_loss"]) for m in m_ce)
    assert not any("ebft/ce_loss" in m for m in m_none)
    for m in m_ce:  # loss = rl_coef * rl + ce_coef * ce, logging every step
        assert m["loss"] == pytest.approx(m["ebft/rl_loss"] + 0.5 * m["ebft/ce_loss"], rel=1e-5)
    # Step 1 starts from the same weights: same rollouts and rewards, and its CE is the base model's NLL.
    records = read_jsonl(with_ce / "completions.jsonl")
    assert [r for r in records if r["step"] == 1] == [
        r for r in read_jsonl(without / "completions.jsonl") if r["step"] == 1
    ]
    assert m_ce[0]["ebft/reward"] == m_none[0]["ebft/reward"]
    assert m_ce[0]["ebft/ce_loss"] == pytest.approx(_step_one_ce(tiny_tokenizer, data, records), rel=1e-4)
    assert max_abs_diff(load_weights(with_ce), load_weights(without)) > 1e-4  # CE changes the update


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

    config = structured_config(
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
    cfg = load_config(write_run_config(tmp_path, f"runner-{async_prefetch}", config))
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

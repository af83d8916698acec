"""SFT as a runner of the training loop: the loss against a plain hand-written cross-entropy step, exact resume,
accumulation invariance, the loop's early stop, and the loop knowing no mode.

Layout arithmetic: with ``pack: false`` every stdlib document (thousands of tokens) is cut to exactly
``sequence_len`` tokens, all labelled, so a row of 48 tokens has 47 targets.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import stdlib_texts
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import ebft.train.loop
from ebft.config import parse_config
from ebft.data.load import load_strided_datasets
from ebft.modeling.tokenizer import load_tokenizer
from ebft.sft.runner import mode as sft_mode
from ebft.train.loop import train

SEQUENCE_LEN = 48
TIMING = ("tokens_per_second", "step_seconds", "peak_memory_mib")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    texts = [t for t in stdlib_texts(24) if len(t) >= 2000][:16]
    path.write_text("".join(json.dumps({"text": t[:4000]}) + "\n" for t in texts), encoding="utf-8")
    return path


def _config(model_dir: Path, data: Path, out: Path, **top):
    raw = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8},
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform", "pack": False}],
        "sequence_len": SEQUENCE_LEN,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 3,
        "learning_rate": 0.05,
        "optimizer": "sgd",
        "lr_scheduler": "constant",
        "max_grad_norm": 1.0,
        "bf16": False,
        "seed": 5,
        "output_dir": str(out),
        **top,
    }
    return parse_config(raw, source="test")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _hand_written_sft(cfg, model_dir: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The oracle: plain SGD on the model's own forward, one document at a time. Step k takes the rows at
    places k*4 .. k*4+3 of the first epoch's permutation (randperm seeded by the seed; 16 rows, so 3 steps of
    2 x 2 stay inside it); its loss is the summed NLL of every labelled target over the step's count; the
    gradient is clipped to ``max_grad_norm`` and the weights move by lr x gradient."""
    rows = load_strided_datasets(cfg, load_tokenizer(cfg)).train
    assert len(rows) == 16 and all(len(r["input_ids"]) == SEQUENCE_LEN for r in rows)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for step in range(cfg.max_steps):
        docs = [rows[i] for i in order[step * 4 : step * 4 + 4]]
        nll, targets = torch.zeros(()), 0
        for row in docs:
            ids, labels = torch.tensor(row["input_ids"])[None], torch.tensor(row["labels"])
            logits = model(input_ids=ids).logits[0, :-1]  # position p predicts token p + 1
            nll = nll + torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")
            targets += int((labels[1:] != -100).sum())
        assert targets == 4 * (SEQUENCE_LEN - 1)
        (nll / targets).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        with torch.no_grad():
            for p in params:
                p -= cfg.learning_rate * p.grad
                p.grad = None
        losses.append(float(nll) / targets)
    return {k: v.detach() for k, v in model.state_dict().items()}, losses


def test_sft_through_the_loop_is_the_hand_written_cross_entropy_step(tmp_path, tiny_model_dir, text_file):
    # Gradient norms here are about 2: a clip at 10 leaves them as they are, so a loss scaled by a wrong count
    # (a micro-batch's targets instead of the step's) would move the weights by a different amount.
    cfg = _config(tiny_model_dir, text_file, tmp_path / "sft", max_grad_norm=10.0)
    result = train(cfg, sft_mode())
    assert result.steps == 3
    expected, losses = _hand_written_sft(cfg, tiny_model_dir)
    logged = _metrics(tmp_path / "sft")
    assert [row["step"] for row in logged] == [1, 2, 3]
    for row, loss in zip(logged, losses, strict=True):
        assert row["loss"] == row["ce_loss"] == pytest.approx(loss, rel=1e-5)
        assert row["learning_rate"] == 0.05 and row["ebft/skipped_steps"] == 0 and row["grad_norm"] < 10
    got = load_file(tmp_path / "sft" / "model.safetensors")
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], atol=2e-6, rtol=1e-5, msg=key)
    # What the loop writes for every runner: the resolved config and the final model.
    assert (tmp_path / "sft" / "config.yaml").exists() and (tmp_path / "sft" / "tokenizer.json").exists()


def test_sft_resumes_exactly(tmp_path, tiny_model_dir, text_file):
    """4 steps == 2 steps, then 2 more from checkpoint-2 (in a folder holding only that checkpoint): the same
    weights and the same logged means; logging every 3 steps, so step 3's mean spans the resume."""
    keys = {"max_steps": 4, "logging_steps": 3, "save_steps": 2, "optimizer": "adamw_torch", "learning_rate": 1e-3}
    whole = tmp_path / "whole"
    train(_config(tiny_model_dir, text_file, whole, **keys), sft_mode())
    part = tmp_path / "part"
    shutil.copytree(whole / "checkpoint-2", part / "checkpoint-2")
    assert json.loads((part / "checkpoint-2" / "trainer_state.json").read_text())["window"]["steps"] == 2
    resumed = _config(tiny_model_dir, text_file, part, **keys, resume_from_checkpoint="latest")
    assert train(resumed, sft_mode()).steps == 4
    assert [row["step"] for row in _metrics(whole)] == [3, 4]
    assert _untimed(_metrics(part)) == _untimed(_metrics(whole))
    wa, wb = load_file(whole / "model.safetensors"), load_file(part / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sft_accumulation_split_does_not_change_the_run(tmp_path, tiny_model_dir, text_file):
    """1 micro-batch of 4 documents == 4 micro-batches of 1: the same rows, the same step-global mean."""
    one = _config(tiny_model_dir, text_file, tmp_path / "1x4", micro_batch_size=4, gradient_accumulation_steps=1)
    four = _config(tiny_model_dir, text_file, tmp_path / "4x1", micro_batch_size=1, gradient_accumulation_steps=4)
    train(one, sft_mode())
    train(four, sft_mode())
    for a, b in zip(_metrics(tmp_path / "1x4"), _metrics(tmp_path / "4x1"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wa, wb = load_file(tmp_path / "1x4" / "model.safetensors"), load_file(tmp_path / "4x1" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=1e-5, msg=key)


def test_time_up_stops_after_the_step_under_way_and_saves_as_at_the_end(tmp_path, tiny_model_dir, text_file):
    """time_up says yes after the second step: that step is the last, logged (though logging_steps is 5),
    checkpointed with save_final_checkpoint, the final model written. It is asked after every step, with the
    step and the seconds since the first step began."""
    cfg = _config(
        tiny_model_dir, text_file, tmp_path / "short", max_steps=10, logging_steps=5, save_final_checkpoint=True
    )
    asked: list[tuple[int, float]] = []

    def time_up(step: int, seconds: float) -> bool:
        asked.append((step, seconds))
        return step == 2

    result = train(cfg, sft_mode("pretrain"), time_up=time_up)
    assert result.steps == 2 and result.last_metrics["loss"] > 0
    assert [step for step, _ in asked] == [1, 2] and 0 < asked[0][1] < asked[1][1]
    assert [row["step"] for row in _metrics(tmp_path / "short")] == [2]
    assert (tmp_path / "short" / "checkpoint-2").is_dir() and (tmp_path / "short" / "model.safetensors").exists()


def test_the_loop_knows_no_mode():
    """The loop imports no mode package, names no mode value, and importing it loads no mode package."""
    source = Path(ebft.train.loop.__file__).read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    modes = ("ebft.strided", "ebft.structured", "ebft.sft", "ebft.modes")
    assert not [name for name in imported if name.startswith(modes)]
    assert not re.search(r"\.mode\b|\"strided\"|\"structured\"", source)  # no cfg.ebft.mode, no mode value
    probe = "import sys, ebft.train.loop; print(sorted(m for m in sys.modules if m.startswith({modes!r})))"
    done = subprocess.run([sys.executable, "-c", probe.format(modes=modes)], capture_output=True, text=True, check=True)
    # Only the anchor rule, which the data loader and the strided attention layout share, is loaded.
    assert done.stdout.strip() == "['ebft.strided', 'ebft.strided.anchors']"

"""The Qwen3.5 example configs (axolotl's ``examples/ebft/qwen35-*-ebft-structured.yaml``) train on a tiny Qwen3.5
without vLLM, with only the model, the data and the sizes overridden.

The tiny checkpoint is what the hub's are: the multimodal ``qwen3_5`` wrapper (one-block vision tower) around a
Gated DeltaNet / full-attention text model (3:1, non-unit norm weights), with a tokenizer laid out like
Qwen3.5's, so the examples' own ``stop_token_ids`` [248044, 248046] and pad token are real ids of it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import stdlib_texts
from hybrid_models import QWEN35_SPECIAL, qwen35_tokenizer, save_qwen35
from safetensors import safe_open
from test_examples import _write_data

from ebft.cli import main
from ebft.config import load_config
from ebft.data.structured import prompt_row

EXAMPLES = Path(__file__).resolve().parent / "axolotl_examples"
QWEN35 = [EXAMPLES / "qwen35-4b-ebft-structured.yaml", EXAMPLES / "qwen35-9b-ebft-structured.yaml"]


@pytest.fixture(scope="module")
def qwen35_tok():
    return qwen35_tokenizer(stdlib_texts(20))


@pytest.fixture(scope="module")
def qwen35_dir(qwen35_tok, tmp_path_factory) -> Path:
    return save_qwen35(tmp_path_factory.mktemp("tiny-qwen35"), qwen35_tok)


@pytest.mark.parametrize("example", QWEN35, ids=lambda p: p.stem)
def test_the_examples_have_axolotls_shape(example):
    """LoRA on the full-attention layers (every fourth: 3, 7, ..., 31) and the MLPs only, thinking off, Qwen3.5's
    stop ids, structured mode on a vLLM server."""
    cfg = load_config(example)
    assert cfg.ebft.mode == "structured" and cfg.trl.use_vllm
    assert cfg.trl.chat_template_kwargs == {"enable_thinking": False}
    assert cfg.trl.generation_kwargs.stop_token_ids == [QWEN35_SPECIAL["<|endoftext|>"], QWEN35_SPECIAL["<|im_end|>"]]
    pattern = re.compile(cfg.lora_target_modules)
    attention = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(32) for p in "qkvo"}
    assert {n for n in attention if pattern.fullmatch(n)} == {
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(3, 32, 4) for p in "qkvo"
    }
    assert all(pattern.fullmatch(f"model.layers.{i}.mlp.{p}_proj") for i in range(32) for p in ("gate", "up", "down"))
    assert not any(pattern.fullmatch(f"model.layers.0.linear_attn.{p}") for p in ("in_proj_qkv", "out_proj"))


def test_chat_template_kwargs_reach_the_template(qwen35_tok):
    """enable_thinking: false opens the reply with an empty thinking block, as Qwen3.5's template does."""
    row = {"prompt": [{"role": "user", "content": "def f(x):"}], "ground_truth": "    return x"}
    common = {"sequence_len": 64, "max_completion_length": 16, "source": "test"}
    off = prompt_row(row, qwen35_tok, chat_template_kwargs={"enable_thinking": False}, **common)
    default = prompt_row(row, qwen35_tok, chat_template_kwargs=None, **common)
    assert qwen35_tok.decode(off.prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert qwen35_tok.decode(default.prompt_ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("example", QWEN35, ids=lambda p: p.stem)
def test_the_examples_train_two_steps_without_vllm(example, qwen35_dir, tmp_path, capsys):
    cfg = load_config(example)
    out = tmp_path / "out"
    overrides = [
        f"--base_model={qwen35_dir}",
        f"--datasets.0.path={_write_data(tmp_path / 'data.jsonl', cfg.datasets[0])}",
        "--datasets.0.split=train",
        "--trl.use_vllm=false",
        "--max_steps=2",
        "--sequence_len=128",
        f"--micro_batch_size={cfg.trl.num_generations}",
        "--gradient_accumulation_steps=1",
        "--trl.max_completion_length=12",
        f"--output_dir={out}",
        "--wandb_project=null",
    ]
    assert main(["train", str(example), *overrides]) == 0
    log = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "rollouts: shared-prefill decoder" in log
    assert "padded, one sequence per row, not packed: layers that are not attention" in log
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(isinstance(line["ebft/reward"], float) for line in lines)
    # The adapter sits where the example puts it: the one full-attention layer (3 of 4) and every MLP.
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        adapted = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in f.keys()}  # noqa: SIM118
    assert adapted == {f"model.layers.3.self_attn.{p}_proj" for p in "qkvo"} | {
        f"model.layers.{i}.mlp.{p}_proj" for i in range(4) for p in ("gate", "up", "down")
    }

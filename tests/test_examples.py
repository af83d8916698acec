"""Every shipped example config trains end to end through ``ebft.cli.main``.

The hub model and dataset of each example are swapped for the tiny local model and a local file in the
format the example's transform reads, written from real text (this Python's standard library); the
run is cut to 2 short steps. Everything else is the example as a user would copy it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import stdlib_texts

from ebft.cli import main
from ebft.config import config_warnings, load_config

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))


def test_the_documented_examples_exist():
    assert {p.name for p in EXAMPLES} >= {
        "llama-1b-strided-raw-text.yaml",
        "llama-1b-strided-prompt-completion.yaml",
        "llama-3b-strided-full-finetune.yaml",
        "qwen-strided-chat.yaml",
        "llama-1b-structured-opencode.yaml",
        "qwen3-4b-structured-vllm.yaml",
        "qwen3-4b-structured-async.yaml",
        "qwen3-4b-structured-multiturn.yaml",
        "qwen3-4b-structured-reasoning.yaml",
        "llama-1b-structured-vllm-full-finetune.yaml",
    }


def _texts() -> list[str]:
    return [text[:4000] for text in stdlib_texts(16) if len(text) >= 2000]


def _text_rows(column: str) -> list[dict]:
    return [{column: text} for text in _texts()]


def _pair_rows() -> list[dict]:
    """A module's first line as the request, the lines after it as the answer."""
    rows = []
    for text in _texts():
        lines = text.splitlines()
        rows.append({"input": lines[0][:60], "output": "\n".join(lines[1:30])})
    return rows


def _chat_rows() -> list[dict]:
    """Two-turn conversations: the assistant answers with source lines, then continues on request."""
    rows = []
    for text in _texts():
        lines = text.splitlines()
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": lines[0][:60]},
                    {"role": "assistant", "content": "\n".join(lines[1:12])},
                    {"role": "user", "content": "Continue."},
                    {"role": "assistant", "content": "\n".join(lines[12:24])},
                ]
            }
        )
    return rows


def _reasoning_rows() -> list[dict]:
    """ShareGPT-style conversations whose answers carry their reasoning in thought markers."""
    rows = []
    for text in _texts():
        lines = text.splitlines()
        answer = "<|begin_of_thought|>\n" + "\n".join(lines[1:6]) + "\n<|end_of_thought|>\n\n" + "\n".join(lines[6:12])
        turns = [{"from": "user", "value": lines[0][:60]}, {"from": "assistant", "value": answer}]
        rows.append({"conversations": turns})
    return rows


def _rows_for(spec) -> list[dict]:
    if spec.type == "ebft_pretrain.transform":
        return _text_rows(spec.field or "text")
    if spec.type in ("ebft_strided_structured.transform", "ebft_opencode.transform"):
        return _pair_rows()
    if spec.type in ("ebft_strided_chat.transform", "ebft_chat_multiturn.transform"):
        return _chat_rows()
    if spec.type == "ebft_reasoning.transform_split_thinking":
        return _reasoning_rows()
    pytest.fail(f"no local test data for transform {spec.type!r}: add a writer to tests/test_examples.py")


def _write_data(path: Path, spec) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in _rows_for(spec)), encoding="utf-8")
    return path


def _train_example(example: Path, tmp_path: Path, model_dir: Path, *extra: str) -> tuple[Path, list[str]]:
    cfg = load_config(example)
    assert len(cfg.datasets) == 1, "the local data swap below covers one dataset entry"
    data = _write_data(tmp_path / "data.jsonl", cfg.datasets[0])
    out = tmp_path / "out"
    overrides = [
        f"--base_model={model_dir}",
        f"--datasets.0.path={data}",
        "--datasets.0.split=train",
        "--max_steps=2",
        "--sequence_len=128",
        "--gradient_accumulation_steps=1",
        "--logging_steps=1",
        "--bf16=false",
        f"--output_dir={out}",
    ]
    if cfg.ebft.mode == "structured":
        # One prompt's group per micro-batch; short completions; the hub model's stop ids do not exist
        # in the tiny vocabulary (its own EOS still stops generation).
        overrides += [
            f"--micro_batch_size={cfg.trl.num_generations}",
            "--trl.max_completion_length=16",
            "--trl.generation_kwargs.stop_token_ids=null",
        ]
    else:
        overrides.append("--micro_batch_size=2")
    overrides += extra
    assert main(["train", str(example), *overrides]) == 0
    return out, overrides


def _check_outputs(example: Path, out: Path, overrides: list[str]) -> None:
    cfg = load_config(example, overrides)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    if cfg.ebft.ce_coef > 0:
        assert all("ebft/ce_loss" in line for line in lines)
    reward = "ebft/reward" if cfg.ebft.mode == "structured" else "ebft/mean_reward"
    assert all(isinstance(line[reward], float) for line in lines)
    if cfg.ebft.mode == "structured" and cfg.trl.log_completions:
        records = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
        assert len(records) == 2 * cfg.micro_batch_size  # every completion of both steps
        assert {"prompt", "completion", "ground_truth", "reward", "advantage"} <= records[0].keys()
    assert load_config(out / "config.yaml") == cfg
    if cfg.adapter == "lora":
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        assert not (out / "model.safetensors").exists()
    else:
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()

    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates_without_warnings(example, capsys):
    assert main(["validate", str(example)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    cfg = load_config(example)
    assert config_warnings(cfg) == []
    # stderr holds the memory plan (or why there is none: the hub model's config is not cached) and, with
    # use_vllm, one warning that no server answers here, naming how to start one.
    assert "memory plan" in err and "error" not in err
    if cfg.trl.use_vllm:
        assert err.startswith("WARNING trl.use_vllm: no vLLM server answers at 127.0.0.1:8000 yet; start it with")
        assert err.count("WARNING") == 1
    else:
        assert "WARNING" not in err


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_trains_as_written(example, tmp_path, tiny_model_dir):
    if load_config(example).trl.use_vllm:
        from fake_vllm import FakeVLLMServer

        # The vLLM examples run against a local server that speaks vLLM's endpoints with the tiny model
        # (full-weight sync over gloo, standing in for NCCL on this CPU machine).
        with FakeVLLMServer(tiny_model_dir) as server:
            address = [f"--trl.vllm_server_host={server.host}", f"--trl.vllm_server_port={server.port}"]
            address.append("--vllm.weight_transfer_backend=gloo")
            out, overrides = _train_example(example, tmp_path, tiny_model_dir, *address)
            assert server.calls("/v1/completions"), "the example did not generate on the server"
            if load_config(example).trl.vllm_lora_sync:
                assert server.calls("/v1/load_lora_adapter"), "the adapter was never synced to the server"
            else:
                assert server.receiver.versions[-1] == "step-2", "the weights were never synced to the server"
    else:
        out, overrides = _train_example(example, tmp_path, tiny_model_dir)
    _check_outputs(example, out, overrides)

"""Every axolotl EBFT example config runs unchanged.

``tests/axolotl_examples/`` holds this project's copies of the nine configs in axolotl's current
``examples/ebft/`` (same keys and values: ``attn_implementation: flash_attention_2``, ``chat_template: llama3``,
``wandb_project: ebft``, ...). Each trains two steps through ``ebft.cli.main`` with only what cannot exist here
swapped: the hub model (for a tiny local one whose tokenizer knows the example's pad token), the hub dataset
(for local rows in its transform's format), the run length and sizes, and the vLLM server's address. wandb is
not installed (its import is blocked even where it is): an example that sets ``wandb_project`` must then stop
with one clean error before anything is written or loaded, and train once ``wandb_project`` is unset; the one
that only sets ``use_tensorboard`` trains as written. The four vLLM examples sample from FakeVLLMServer; none
sets ``trl.vllm_lora_sync``, so their LoRA policy reaches the server as merged full weights through the
weight-transfer protocol (gloo standing in for NCCL), and the server's weights must end equal to the merged
final adapter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_examples import _write_data

from ebft.cli import main
from ebft.config import config_warnings, load_config

EXAMPLES = sorted((Path(__file__).resolve().parent / "axolotl_examples").glob("*.yaml"))
# The pad tokens the examples name (Llama 3's and Qwen's), which the tiny tokenizer lacks.
PAD_TOKENS = ["<|end_of_text|>", "<|endoftext|>"]


def test_the_nine_examples_are_here():
    assert [p.stem for p in EXAMPLES] == [
        "llama-1b-ebft-opencode-novllm",
        "llama-1b-ebft-opencode",
        "llama-1b-ebft-strided-structured",
        "llama-1b-ebft-strided",
        "llama-3b-ebft-strided-fft",
        "llama-8b-ebft-strided-fft",
        "qwen35-4b-ebft-structured-async",
        "qwen35-4b-ebft-structured",
        "qwen35-9b-ebft-structured",
    ]


@pytest.fixture
def no_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)


WANDB_MISSING = (
    "wandb_project: needs the wandb package, which is not installed; pip install 'ebft[wandb]' "
    "(or set wandb_project: null)"
)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_validates_unchanged(example, capsys, no_wandb):
    warnings = config_warnings(load_config(example))
    keys = [w.split(":")[0] for w in warnings]
    assert len(keys) == len(set(keys))  # one warning per key
    # Only keys that name something ebft does its own way are mentioned, each with what happens instead.
    assert all(": ignored; " in w for w in warnings), warnings
    cfg = load_config(example)
    code = main(["validate", str(example)])
    out, err = capsys.readouterr()
    if cfg.wandb_project is None:
        assert code == 0 and "error" not in err
    else:  # everything else this machine can provide: the one problem is the missing package
        assert (code, out) == (2, "")
        # After the notes (the attention backend this machine runs instead of flash_attention_2, ...).
        problem = f"error: {example}: the config is valid but training cannot start here, 1 problem:\n"
        assert err.endswith(f"{problem}  {WANDB_MISSING}\n")
    assert main(["validate", str(example), "--wandb_project=null"]) == 0


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model, its vocabulary grown by the examples' pad tokens (as a hub checkpoint that has them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-with-pads")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": PAD_TOKENS})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _overrides(cfg, model_dir: Path, data: Path, out: Path) -> list[str]:
    overrides = [
        f"--base_model={model_dir}",
        f"--datasets.0.path={data}",
        "--datasets.0.split=train",
        "--max_steps=2",
        "--sequence_len=128",
        "--gradient_accumulation_steps=1",
        f"--output_dir={out}",
    ]
    if cfg.ebft.mode == "structured":
        # One prompt's group per step; short completions; Qwen's stop ids do not exist in the tiny vocabulary.
        overrides += [
            f"--micro_batch_size={cfg.trl.num_generations}",
            "--trl.max_completion_length=16",
            "--trl.generation_kwargs.stop_token_ids=null",
        ]
    return overrides


def _train(example: Path, overrides: list[str], out: Path, capsys) -> None:
    """As written (wandb_project included): a run, or one clean error before anything is written or loaded;
    then, after an error, the run without wandb."""
    cfg = load_config(example)
    code = main(["train", str(example), *overrides])
    err = capsys.readouterr().err
    if cfg.wandb_project is not None:
        # After the warnings about the keys ebft ignores, one error and nothing else.
        error = f"\nerror: {example}: cannot train on this machine, 1 problem:\n  {WANDB_MISSING}\n"
        assert code == 2 and ("\n" + err).endswith(error)
        assert err.count("error") == 1
        assert not out.exists()  # stopped before config.yaml, data, model or tokenizer
        code = main(["train", str(example), *overrides, "--wandb_project=null"])
    else:
        assert cfg.use_tensorboard and any((out / "tensorboard").iterdir())  # the example's own tracker
    assert code == 0


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_trains_two_steps(example, model_dir, tmp_path, capsys, no_wandb):
    cfg = load_config(example)
    out = tmp_path / "out"
    overrides = _overrides(cfg, model_dir, _write_data(tmp_path / "data.jsonl", cfg.datasets[0]), out)
    if cfg.trl.use_vllm:
        from fake_vllm import FakeVLLMServer

        with FakeVLLMServer(model_dir) as server:
            overrides += [
                f"--trl.vllm_server_host={server.host}",
                f"--trl.vllm_server_port={server.port}",
                "--vllm.weight_transfer_backend=gloo",
            ]
            _train(example, overrides, out, capsys)
            assert not cfg.trl.vllm_lora_sync and server.calls("/v1/completions")
            # The policy before the first rollouts, and after each step.
            assert server.receiver.versions == ["step-0", "step-1", "step-2"]
            _assert_serves_the_merged_adapter(server, model_dir, out)
    else:
        _train(example, overrides, out, capsys)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    reward = "ebft/reward" if cfg.ebft.mode == "structured" else "ebft/mean_reward"
    assert all(isinstance(line[reward], float) for line in lines)
    ran = [*overrides, *(["--wandb_project=null"] if cfg.wandb_project is not None else [])]
    assert load_config(out / "config.yaml") == load_config(example, ran)


def _assert_serves_the_merged_adapter(server, model_dir: Path, out: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = {name: value.clone() for name, value in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, out).merge_and_unload().state_dict()
    served = server.base.state_dict()
    assert served.keys() == merged.keys()
    assert all(torch.equal(served[name], value) for name, value in merged.items())  # PEFT's merge, bit for bit
    # ... and not the base weights: two small steps (learning rate 5e-6) moved the adapted ones by about 3e-6.
    assert max(float((merged[name] - before[name]).abs().max()) for name in merged) > 1e-6

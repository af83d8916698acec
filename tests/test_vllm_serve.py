"""``ebft vllm-serve``: the printed server command, refusals, the server process's signals, and training that
samples from the (fake) server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import stdlib_texts
from fake_vllm import COMPLETIONS
from launchers import train_on_two_processes

from ebft.cli import main
from ebft.structured.rollout import Sampling
from ebft.vllm.backend import vllm_backend
from ebft.vllm.serve import _run

# -- ebft vllm-serve --------------------------------------------------------------------------

CONFIG = """\
base_model: {model}
rl: ebft
ebft:
  mode: structured
trl:
  num_generations: 2
  use_vllm: true
  vllm_lora_sync: true
micro_batch_size: 2
adapter: lora
lora_r: 12
lora_target_linear: true
datasets:
  - path: data.jsonl
    type: ebft_opencode.transform
"""


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG.format(model=tmp_path / "model"))
    return path


def _flags(argv: list[str]) -> dict[str, str | None]:
    """--flag value pairs (None for a bare flag) of a printed command line."""
    out: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def test_print_command_defaults(config, tmp_path, capsys):
    assert main(["vllm-serve", str(config), "--print-command"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[:4] == [
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True",
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
    ]
    assert _flags(argv) == {
        "--model": str(tmp_path / "model"),
        "--host": "127.0.0.1",
        "--port": "8000",
        "--gpu-memory-utilization": "0.9",
        "--tensor-parallel-size": "1",
        "--dtype": "auto",
        "--enable-lora": None,
        "--max-lora-rank": "16",  # lora_r 12 rounded up to a rank vLLM accepts
        "--max-loras": "2",
        "--logprobs-mode": "processed_logprobs",
        "--seed": "42",
    }


def test_print_command_uses_the_configured_server(config, capsys):
    config.write_text(
        config.read_text()
        + "trust_remote_code: true\nseed: 7\nvllm:\n  host: 0.0.0.0\n  port: 8123\n  gpu_memory_utilization: 0.5\n"
        "  max_model_len: 4096\n  tensor_parallel_size: 2\n  enforce_eager: true\n  dtype: bfloat16\n"
    )
    assert main(["vllm-serve", str(config), "--print-command", "--lora_r=64"]) == 0
    flags = _flags(shlex.split(capsys.readouterr().out))
    assert {k: flags[k] for k in ("--host", "--port", "--gpu-memory-utilization", "--max-model-len")} == {
        "--host": "0.0.0.0",
        "--port": "8123",
        "--gpu-memory-utilization": "0.5",
        "--max-model-len": "4096",
    }
    assert flags["--tensor-parallel-size"] == "2" and flags["--dtype"] == "bfloat16"
    assert flags["--max-lora-rank"] == "64" and flags["--seed"] == "7"
    assert "--enforce-eager" in flags and "--trust-remote-code" in flags


def test_print_command_follows_the_trl_address(config, capsys):
    args = ["--trl.vllm_server_host=10.1.2.3", "--trl.vllm_server_port=9000"]
    assert main(["vllm-serve", str(config), "--print-command", *args]) == 0
    flags = _flags(shlex.split(capsys.readouterr().out))
    assert (flags["--host"], flags["--port"]) == ("10.1.2.3", "9000")


def test_print_command_for_full_weight_sync(config, tmp_path, capsys):
    """vllm_lora_sync: false -> vLLM's weight transfer (dev-mode routes, NCCL backend) instead of LoRA."""
    overrides = ["--trl.vllm_lora_sync=false", "--vllm.data_parallel_size=2", "--vllm.enable_prefix_caching=false"]
    assert main(["vllm-serve", str(config), "--print-command", *overrides]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[:2] == ["VLLM_SERVER_DEV_MODE=1", sys.executable]
    flags = _flags(argv)
    assert json.loads(flags["--weight-transfer-config"]) == {"backend": "nccl"}
    assert flags["--data-parallel-size"] == "2" and "--no-enable-prefix-caching" in flags
    assert not {"--enable-lora", "--max-lora-rank", "--max-loras"} & flags.keys()
    assert (flags["--host"], flags["--logprobs-mode"]) == ("127.0.0.1", "processed_logprobs")


def test_gloo_weight_transfer_is_not_served_by_vllm(config, capsys):
    args = ["--trl.vllm_lora_sync=false", "--vllm.weight_transfer_backend=gloo"]
    assert main(["vllm-serve", str(config), "--print-command", *args]) == 2
    assert "vllm.weight_transfer_backend: vLLM's weight transfer speaks nccl" in capsys.readouterr().err


def test_lora_rank_beyond_vllm_is_refused(config, capsys):
    assert main(["vllm-serve", str(config), "--print-command", "--lora_r=600"]) == 2
    assert "lora_r: vLLM serves LoRA adapters of rank <= 512 (got 600)" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_says_how_to_install_it(config, capsys):
    assert main(["vllm-serve", str(config)]) == 2
    err = capsys.readouterr().err
    assert "trl.use_vllm: needs the vllm package, which is not installed; pip install 'ebft[vllm]'" in err


def test_server_process_gets_sigterm_and_its_status_is_returned():
    assert _run([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ)) == 3
    # A SIGTERM to `ebft vllm-serve` reaches the server (here: a child that exits 7 on SIGTERM).
    child = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(7)); time.sleep(30)"
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    start = time.monotonic()
    assert _run([sys.executable, "-c", child], dict(os.environ)) == 7
    assert time.monotonic() - start < 20
    assert signal.getsignal(signal.SIGTERM) is before


def test_training_backend_from_the_config(config, fake, tmp_path):
    from ebft.config import load_config

    overrides = [f"--trl.vllm_server_port={fake.port}", "--trl.vllm_sync_interval=3", f"--output_dir={tmp_path}/out"]
    cfg = load_config(config, overrides)
    backend = vllm_backend(cfg, Sampling())
    assert (backend.client.host, backend.client.port, backend.client.timeout) == ("127.0.0.1", fake.port, 240.0)
    assert fake.calls("/health") != []  # it waited for the server
    assert backend.sync_interval == 3 and backend.model_name == cfg.base_model
    assert backend.adapter_dir == tmp_path / "out" / "vllm_adapters" and backend.lora_name == "ebft"


def _vllm_training_config(fake, tmp_path: Path, *, max_steps: int, **trl) -> Path:
    """A small structured LoRA config whose rollouts come from ``fake``; ``trl`` keys are added."""
    data = tmp_path / "pairs.jsonl"
    rows = [{"input": t.splitlines()[0][:60], "output": "\n".join(t.splitlines()[1:6])[:200]} for t in stdlib_texts(8)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "base_model": fake.served_model_name,
        "rl": "ebft",
        "ebft": {"mode": "structured"},
        "trl": {
            "num_generations": 2,
            "max_completion_length": 8,
            "temperature": 1.0,
            "use_vllm": True,
            "vllm_lora_sync": True,
            "vllm_server_port": fake.port,
            **trl,
        },
        "datasets": [{"path": str(data), "type": "ebft_opencode.transform"}],
        "sequence_len": 128,
        "micro_batch_size": 2,
        "max_steps": max_steps,
        "learning_rate": 1e-3,
        "bf16": False,
        "seed": 0,
        "adapter": "lora",
        "lora_r": 4,
        "lora_target_linear": True,
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_structured_training_samples_from_the_server(fake, tiny_model_dir, tmp_path):
    path = _vllm_training_config(fake, tmp_path, max_steps=4, vllm_sync_interval=2)
    assert main(["train", str(path)]) == 0
    models = [c.body["model"] for c in fake.calls(COMPLETIONS)]
    loaded = [c.body["lora_name"] for c in fake.calls("/v1/load_lora_adapter")]
    steps = [int(name.rsplit("-step", 1)[1]) for name in loaded]
    # The first rollouts come from the base model (a fresh adapter is zero); after the first load, only
    # every second step loads, and rollouts name the adapter loaded most recently before them.
    assert models[0] == fake.served_model_name and steps[-1] == 4
    assert all(step % 2 == 0 for step in steps[1:]) and steps == sorted(steps)
    assert set(models) <= {fake.served_model_name, *loaded} and models[-1] == loaded[-2]
    assert fake.adapters == {} and not (tmp_path / "out" / "vllm_adapters").exists()


def test_two_processes_share_one_adapter_per_sync(fake, tiny_model_dir, tmp_path):
    """Under 2 processes only the main one saves and loads the adapter; both then generate with it."""
    path = _vllm_training_config(fake, tmp_path, max_steps=3)
    train_on_two_processes(path, port=29541)
    loaded = [c.body["lora_name"] for c in fake.calls("/v1/load_lora_adapter")]
    # One load after every step (sync_interval 1), made once for both processes.
    assert [int(name.rsplit("-step", 1)[1]) for name in loaded] == [1, 2, 3]
    models = [c.body["model"] for c in fake.calls(COMPLETIONS)]
    assert len(models) == 3 * 2  # 3 steps x 2 processes x 1 prompt each
    assert models[:2] == [fake.served_model_name] * 2  # step 1: the base model, on both processes
    assert sorted(models[2:]) == sorted([loaded[0]] * 2 + [loaded[1]] * 2)  # later steps: the shared adapter
    assert fake.adapters == {}

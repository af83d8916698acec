"""Two "nodes" on this machine: two torchrun launchers, one process each, meeting through a c10d rendezvous
on 127.0.0.1 (gloo), train exactly like one process with the same global batch, in both modes and with FSDP2.

This is the multi-node launch of the guide (``torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d
--rdzv-endpoint HOST:PORT -m ebft train cfg.yaml`` on each machine) with both machines on loopback: every
process has local rank 0, so anything that took "local main process" for "main process" would write twice,
and any per-node state that leaked into the update would show against the single process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from config_builders import assert_same_run
from conftest import stdlib_texts

from ebft.cli import main

_PORT = iter(range(29731, 29790))
_TIMEOUT = 240  # seconds for both launchers; a rendezvous or collective mistake hangs rather than fails


def two_node_commands(port: int, *args: str) -> list[list[str]]:
    """The same command line for each node: torchrun, 2 nodes x 1 process, c10d rendezvous on loopback."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    options = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d"]
    options += [
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"ebft-two-nodes-{port}",
        "--local-addr",
        "127.0.0.1",
    ]
    return [[*torchrun, *options, "-m", "ebft", "train", *args] for _ in range(2)]


def train_on_two_nodes(cfg: Path, *args: str) -> str:
    """Start both "nodes", wait for both, and return their combined output (asserting that both succeeded)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for cmd in two_node_commands(next(_PORT), str(cfg), *args)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=_TIMEOUT)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    return "\n".join(outputs)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "code.jsonl"
    path.write_text("".join(json.dumps({"text": t[:3000]}) + "\n" for t in stdlib_texts(12)))
    return path


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    rows = []
    for text in stdlib_texts(12):
        lines = [line for line in text.splitlines() if line.strip()]
        rows.append({"input": lines[0][:60], "output": "\n".join(lines[1:4])})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _config(model_dir: Path, data: Path, mode: str, **over) -> dict:
    if mode == "strided":
        ebft = {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 4}
        ebft |= {"n_samples_per_prompt": 3, "temperature": 1.0, "ce_coef": 0.05}
        dataset, extra = {"path": str(data), "type": "ebft_pretrain.transform"}, {"sequence_len": 64}
    else:
        ebft = {"mode": "structured", "ce_coef": 0.05}
        dataset = {"path": str(data), "type": "ebft_opencode.transform"}
        extra = {"sequence_len": 96, "trl": {"num_generations": 4, "max_completion_length": 10, "temperature": 1.0}}
    cfg = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": ebft,
        "datasets": [dataset],
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "optimizer": "sgd",
        "bf16": False,
        "seed": 3,
        **extra,
    }
    return cfg | over


_KEYS = {
    "strided": ("loss", "ebft/alignment", "ebft/diversity", "ebft/ce_loss", "grad_norm"),
    "structured": ("loss", "ebft/alignment", "ebft/reward", "ebft/ce_loss", "grad_norm"),
}


@pytest.mark.parametrize(
    ("mode", "fsdp", "per_node", "whole"),
    [("strided", False, 1, 2), ("strided", True, 1, 2), ("structured", True, 4, 8)],
    ids=["strided", "strided-fsdp2", "structured-fsdp2"],
)
def test_two_nodes_train_like_one_process(tmp_path, tiny_model_dir, data_file, pair_file, mode, fsdp, per_node, whole):
    """2 nodes x micro-batch ``per_node`` == 1 process x ``whole``: same metrics every step, same weights saved."""
    lora = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}
    over = lora | ({"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}} if fsdp else {})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(tiny_model_dir, data_file if mode == "strided" else pair_file, mode, **over)))
    two, one = tmp_path / "two", tmp_path / "one"
    out = train_on_two_nodes(cfg, f"--micro_batch_size={per_node}", f"--output_dir={two}")
    if fsdp:
        assert "FSDP2: policy sharded over 2 processes" in out
    assert main(["train", str(cfg), f"--micro_batch_size={whole}", f"--output_dir={one}"]) == 0
    assert assert_same_run(two, one, _KEYS[mode]) == [1, 2]

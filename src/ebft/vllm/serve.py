"""``ebft vllm-serve CFG``: start the vLLM server that structured-mode training samples from.

It runs vLLM's own OpenAI-compatible server with what training relies on:

* how the policy reaches the server (``sync_mode``):

  - ``trl.vllm_lora_sync: true``: ``--enable-lora`` with ``--max-lora-rank`` covering ``lora_r`` and two
    adapter slots (the current adapter and the one replacing it), plus
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, which vLLM requires before it exposes
    ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``;
  - otherwise full weights: ``--weight-transfer-config '{"backend": "nccl"}'`` plus
    ``VLLM_SERVER_DEV_MODE=1``, which vLLM requires before it exposes its weight-transfer routes
    (``/init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``,
    ``/finish_weight_update``, ``/get_world_size``, ``/reset_prefix_cache``);
* ``--logprobs-mode processed_logprobs``: reported log-probs are those of the distribution actually
  sampled (after repetition penalty, temperature, min-p, top-k, top-p; vLLM >= 0.10.2), which is what
  the importance-sampling correction needs; the default would report the untempered model;
* the address of the ``vllm:`` block (127.0.0.1 unless configured, see ``vllm_serve_address``), the
  server settings of that block, and the run's seed.

The server runs as a child process in its own session, and SIGINT / SIGTERM are passed on to it
exactly once: Ctrl-C starts vLLM's graceful shutdown (which also stops its engine processes that hold
the GPU) and a second Ctrl-C its forced one, and a job manager's SIGTERM does not leave an orphaned
server behind. The command's exit status is the server's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys

from ebft.config import TrainConfig, vllm_serve_address
from ebft.errors import ConfigError, EbftError
from ebft.modeling.source import local_model

# The values vLLM accepts for --max-lora-rank (its LoRAConfig.max_lora_rank choices, 0.10 onwards).
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
WEIGHT_TRANSFER_ENV = {"VLLM_SERVER_DEV_MODE": "1"}


def sync_mode(cfg: TrainConfig) -> str:
    """How training keeps the server's policy current: ``"lora"`` (hot-loaded adapters) or ``"weights"``
    (full, LoRA-merged weights through vLLM's weight transfer)."""
    return "lora" if cfg.trl.vllm_lora_sync else "weights"


def serve_env(cfg: TrainConfig) -> dict[str, str]:
    """The environment variables the server needs for ``cfg``'s sync mode."""
    return dict(LORA_ENV if sync_mode(cfg) == "lora" else WEIGHT_TRANSFER_ENV)


def max_lora_rank(lora_r: int) -> int:
    """The smallest rank vLLM accepts that holds a rank-``lora_r`` adapter."""
    for rank in LORA_RANKS:
        if lora_r <= rank:
            return rank
    raise ConfigError(f"lora_r: vLLM serves LoRA adapters of rank <= {LORA_RANKS[-1]} (got {lora_r})")


def serve_command(cfg: TrainConfig) -> list[str]:
    """The argv that starts vLLM's OpenAI-compatible server for ``cfg`` (run with ``serve_env(cfg)`` set)."""

    host, port = vllm_serve_address(cfg)
    v = cfg.vllm
    # A .gguf base model is served from its converted folder, the very weights the trainer loads.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", local_model(cfg.base_model)]
    cmd += ["--host", host, "--port", str(port)]
    cmd += ["--gpu-memory-utilization", str(v.gpu_memory_utilization)]
    cmd += ["--tensor-parallel-size", str(v.tensor_parallel_size), "--dtype", v.dtype]
    if v.max_model_len is not None:
        cmd += ["--max-model-len", str(v.max_model_len)]
    if v.data_parallel_size > 1:
        cmd += ["--data-parallel-size", str(v.data_parallel_size)]
    if v.enforce_eager:
        cmd.append("--enforce-eager")
    if v.enable_prefix_caching is not None:
        cmd.append("--enable-prefix-caching" if v.enable_prefix_caching else "--no-enable-prefix-caching")
    if sync_mode(cfg) == "lora":
        cmd += ["--enable-lora", "--max-lora-rank", str(max_lora_rank(cfg.lora_r)), "--max-loras", "2"]
    elif v.weight_transfer_backend != "nccl":
        raise ConfigError(
            "vllm.weight_transfer_backend: vLLM's weight transfer speaks nccl; gloo is spoken only by ebft's "
            f"test server (got {v.weight_transfer_backend!r})"
        )
    else:
        cmd += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
    cmd += ["--logprobs-mode", "processed_logprobs"]
    if cfg.trust_remote_code:
        cmd.append("--trust-remote-code")
    cmd += ["--seed", str(cfg.seed)]
    return cmd


def printable(cmd: list[str], env: dict[str, str]) -> str:
    """``cmd`` as one shell line, environment included, ready to paste."""
    return shlex.join([f"{key}={value}" for key, value in env.items()] + cmd)


def vllm_serve(cfg: TrainConfig, *, print_command: bool = False) -> int:
    """Print the command (``print_command``) or run the server until it exits; its exit status."""
    cmd, env = serve_command(cfg), serve_env(cfg)
    if print_command:
        print(printable(cmd, env))
        return 0
    if importlib.util.find_spec("vllm") is None:
        raise EbftError(
            "vLLM is not installed; install it with `pip install 'ebft[vllm]'` (it needs a CUDA GPU and its own "
            "torch build) — or train without `trl.use_vllm` (rollouts then use transformers generate)"
        )
    return _run(cmd, {**os.environ, **env})


def _run(cmd: list[str], env: dict[str, str]) -> int:
    # Its own session: a terminal's Ctrl-C reaches only this process, which forwards it once (see the
    # module docstring); otherwise vLLM would get every signal twice and skip its graceful shutdown.
    child = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, _frame) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # Killed by a signal: the shell's convention, 128 + its number.
    return 128 - status if status < 0 else status

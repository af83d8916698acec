"""The rollout backend training uses with ``trl.use_vllm``: the server's address, the wait for it, and
how the policy reaches it (LoRA adapter or full weights)."""

from __future__ import annotations

from pathlib import Path

from ebft.config import TrainConfig, vllm_client_address
from ebft.errors import ConfigError
from ebft.modeling.source import local_model
from ebft.structured.rollout import Sampling
from ebft.vllm.client import VLLMClient, VLLMError
from ebft.vllm.lora import VLLMBackend
from ebft.vllm.weights import weight_sync_backend

# How long `ebft validate` waits for the vLLM server to answer: it only reports, so it must be quick.
PROBE_SECONDS = 2.0


def uses_server(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` samples its rollouts from a vLLM server."""
    return cfg.ebft.mode == "structured" and cfg.trl.use_vllm


def wait_for_server(cfg: TrainConfig, timeout: float | None = None) -> None:
    """With ``trl.use_vllm``: wait for the server up to ``trl.vllm_server_timeout`` seconds, saying where and how
    long is left (``ebft train`` does this before loading anything); ConfigError naming the key when it never
    answers."""
    if not uses_server(cfg):
        return
    host, port = vllm_client_address(cfg)
    wait = cfg.trl.vllm_server_timeout if timeout is None else timeout
    try:
        VLLMClient(host, port, timeout=min(wait, 10.0)).wait_until_ready(wait)
    except VLLMError as exc:
        raise ConfigError(f"trl.use_vllm: {exc}") from exc


def probe_server(cfg: TrainConfig, seconds: float = PROBE_SECONDS) -> str | None:
    """A note when the vLLM server of a ``trl.use_vllm`` config does not answer within ``seconds`` (None when it
    does, or when the config does not use one): what ``ebft validate`` says."""
    if not uses_server(cfg):
        return None
    host, port = vllm_client_address(cfg)
    try:
        VLLMClient(host, port, timeout=seconds, retries=0).wait_until_ready(seconds, interval=0.5, report_every=None)
    except VLLMError:
        return (
            f"trl.use_vllm: no vLLM server answers at {host}:{port} yet; start it with `ebft vllm-serve CFG` "
            f"before `ebft train`, which waits for it up to trl.vllm_server_timeout = {cfg.trl.vllm_server_timeout:g} s"
        )
    return None


def vllm_backend(cfg: TrainConfig, sampling: Sampling, gathered=None):
    """The backend training uses with ``trl.use_vllm``: the server of ``ebft vllm-serve`` (same config),
    waited for up to ``trl.vllm_server_timeout`` seconds, which is also each request's timeout.

    With ``trl.vllm_lora_sync`` the LoRA adapter is hot-loaded (this module); under a multi-process launch
    the main process syncs the (identical) adapter for all of them and broadcasts its name. Otherwise the
    full weights go through vLLM's weight transfer (``ebft.vllm.weights``), gathered with
    ``gathered()`` when the policy is sharded.
    """

    host, port = vllm_client_address(cfg)
    client = VLLMClient(host, port, timeout=cfg.trl.vllm_server_timeout)
    client.wait_until_ready(cfg.trl.vllm_server_timeout)
    if not cfg.trl.vllm_lora_sync:
        return weight_sync_backend(cfg, sampling, client, gathered)
    from accelerate import PartialState

    state = PartialState()
    share = None
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        def share(name: str) -> str:
            return broadcast_object_list([name], from_process=0)[0]

    return VLLMBackend(
        client,
        sampling=sampling,
        leader=state.is_main_process,
        share=share,
        lora_name="ebft",
        adapter_dir=Path(cfg.output_dir) / "vllm_adapters",
        sync_interval=cfg.trl.vllm_sync_interval,
        # vLLM serves the base model under its --model argument, which `ebft vllm-serve` sets to this.
        base_model_name=local_model(cfg.base_model),
        fresh_adapter=cfg.lora_model_dir is None,
    )

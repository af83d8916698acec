"""The rollout backend training uses with ``trl.use_vllm``: the server's address, the wait for it, and
how the policy reaches it (LoRA adapter or full weights)."""

from __future__ import annotations

from pathlib import Path

from ebft.config import vllm_client_address
from ebft.modeling.source import local_model
from ebft.structured.rollout import Sampling
from ebft.vllm.client import VLLMClient
from ebft.vllm.lora import VLLMBackend
from ebft.vllm.weights import weight_sync_backend


def vllm_backend(cfg, sampling: Sampling, gathered=None):
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

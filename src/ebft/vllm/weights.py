"""``RolloutBackend`` on a vLLM server whose weights full-weight sync replaces (docs/design.md §6.6).

Used with ``trl.use_vllm: true`` and ``trl.vllm_lora_sync: false``: full fine-tuning, or LoRA sent as merged
weights. Requests name the served base model; what it computes with is whatever the last sync sent.

* ``sync`` sends the weights (``ebft.vllm.weight_source``) with vLLM's weight-transfer protocol
  (``ebft.vllm.weight_transfer``) on its first call, whatever the step (the server may hold a
  previous run's weights, and a resumed policy is not the base), then every ``sync_interval`` steps.
* Only the main process (``transfer`` given) sends. Under several processes every process calls ``sync``
  at the same steps; ``collective`` lines them up and hands the main process's outcome to all, so a
  failed transfer stops every process. Under FSDP the weights are gathered (``gathered``, a collective)
  for the transfer.
* Never a rollout from a half-updated server: ``generate`` and ``sync`` exclude each other (an async
  prefetch still running finishes first, on the old weights; no request starts until the transfer has
  finished), every process waits for its own rollouts before the main process starts, and once a
  transfer has failed ``generate`` refuses.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ebft.config import TrainConfig
from ebft.errors import ConfigError
from ebft.modeling.source import local_model
from ebft.structured.rollout import Completion, Sampling
from ebft.vllm.client import VLLMClient, VLLMError, VLLMSyncError, sample
from ebft.vllm.transport import GlooTransport, NcclTransport
from ebft.vllm.weight_source import policy_entries
from ebft.vllm.weight_transfer import WeightTransfer

log = logging.getLogger("ebft")


@dataclass(frozen=True)
class Collective:
    """What several training processes do together: wait for each other; share the main process's value."""

    barrier: Callable[[], None]
    share: Callable[[Any], Any]


class WeightSyncBackend:
    def __init__(
        self,
        client: VLLMClient,
        *,
        sampling: Sampling,
        model_name: str,
        sync_interval: int,
        transfer: WeightTransfer | None,
        wire_dtype: torch.dtype | None = None,
        served_vocab_size: int | None = None,
        gathered: Callable[[], AbstractContextManager] = nullcontext,
        collective: Collective | None = None,
        max_concurrent: int = 32,
    ):
        self.client, self.sampling, self.model_name = client, sampling, model_name
        self.sync_interval, self.transfer = sync_interval, transfer
        self.wire_dtype, self.served_vocab_size = wire_dtype, served_vocab_size
        self.gathered, self.collective, self.max_concurrent = gathered, collective, max_concurrent
        self._lock = threading.Lock()
        self._consistent = True
        self._started = False
        self._synced_step: int | None = None

    def generate(
        self, prompts: list[list[int]], n: int, max_tokens: list[int], seeds: list[int]
    ) -> list[list[Completion]]:
        with self._lock:
            if not self._consistent:
                raise VLLMError(
                    "the last weight transfer to the vLLM server did not finish, so its weights are partly "
                    "updated; ebft does not sample from it (restart the server and resume the run)"
                )
            return sample(
                self.client, self.model_name, self.sampling, prompts, n, max_tokens, seeds, self.max_concurrent
            )

    def sync(self, model, step: int) -> None:
        """Send ``model``'s weights (the policy after optimizer step ``step``) when the schedule says so."""
        first, self._started = not self._started, True
        if (not first and step % self.sync_interval) or step == self._synced_step:
            return
        self._check_vocabulary(model)
        with self._lock:
            if self.collective is not None:
                self.collective.barrier()  # every process's rollouts are done before the weights change
            failure, cause = None, None
            with self.gathered():
                if self.transfer is not None:
                    try:
                        entries = policy_entries(model, wire_dtype=self.wire_dtype)
                        self.transfer.push(entries, version=f"step-{step}")
                    except Exception as exc:  # shared below, so that every process stops
                        failure = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
                        cause = exc
            if self.collective is not None:
                failure = self.collective.share(failure)
            if failure is not None:
                self._consistent = False
                raise VLLMSyncError(f"full-weight sync after step {step} failed: {failure}") from cause
        self._synced_step = step
        log.debug("vLLM now generates with the weights after step %d", step)

    def _check_vocabulary(self, model) -> None:
        rows = model.get_input_embeddings().num_embeddings
        if self.served_vocab_size is not None and rows != self.served_vocab_size:
            raise ConfigError(
                f"special_tokens: the policy's vocabulary has {rows} tokens but the vLLM server serves base_model "
                f"with {self.served_vocab_size}, and a weight transfer cannot change a served tensor's shape; save "
                "the model with its resized vocabulary, and serve and train that folder as base_model"
            )

    def close(self) -> None:
        if self.transfer is not None:
            self.transfer.close()


def _served_model(cfg: TrainConfig) -> tuple[torch.dtype | None, int | None]:
    """(dtype, vocabulary size) of the weights the server loaded: ``vllm.dtype``, else the checkpoint's own."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        local_model(cfg.base_model), trust_remote_code=cfg.trust_remote_code
    ).get_text_config()
    dtype = getattr(torch, cfg.vllm.dtype) if cfg.vllm.dtype != "auto" else getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return (dtype if isinstance(dtype, torch.dtype) else None), getattr(config, "vocab_size", None)


def weight_sync_backend(cfg: TrainConfig, sampling: Sampling, client: VLLMClient, gathered) -> WeightSyncBackend:
    """The backend of ``cfg`` (full-weight sync) on ``client``'s server; see ``ebft.vllm.backend.vllm_backend``."""
    from accelerate import PartialState

    state, v = PartialState(), cfg.vllm
    transfer = None
    if state.is_main_process:

        def make_transport(world_size: int):
            if v.weight_transfer_backend == "gloo":  # ebft's own test server, on this machine
                return GlooTransport(world_size, v.weight_transfer_timeout)
            return NcclTransport(world_size, v.weight_transfer_timeout, state.device)

        transfer = WeightTransfer(
            client, make_transport, chunk_bytes=v.weight_transfer_chunk_bytes, timeout=v.weight_transfer_timeout
        )
    collective = None
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        collective = Collective(
            barrier=state.wait_for_everyone, share=lambda value: broadcast_object_list([value], from_process=0)[0]
        )
    wire_dtype, vocab = _served_model(cfg)
    return WeightSyncBackend(
        client,
        sampling=sampling,
        model_name=local_model(cfg.base_model),  # `ebft vllm-serve` serves the model under this name
        sync_interval=cfg.trl.vllm_sync_interval,
        transfer=transfer,
        wire_dtype=wire_dtype,
        served_vocab_size=vocab,
        gathered=gathered or nullcontext,
        collective=collective,
    )

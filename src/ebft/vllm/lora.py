"""Rollouts from a vLLM server whose policy is kept current by hot-loading the LoRA adapter
(``trl.vllm_lora_sync: true``)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from ebft.errors import ConfigError, EbftError
from ebft.structured.rollout import Completion, Sampling
from ebft.vllm.client import VLLMClient, VLLMSyncError, sample

log = logging.getLogger("ebft")

# Prefix of the adapter "name" the main process shares when its sync failed (a name never starts so).
_FAILED = "\x00failed: "


class VLLMBackend:
    """``RolloutBackend`` on a vLLM server, generating with the policy's latest synced LoRA adapter.

    ``sync`` saves the adapter to ``adapter_dir/{lora_name}-step-NNNNNN`` (a folder the server must be
    able to read: same machine or shared storage) and loads it as ``{lora_name}-{session}-step{N}``. A new name
    every time because vLLM refuses to reload a loaded name from a new path; the session tag keeps a
    resumed run from colliding with names an earlier, crashed run left loaded on the same server.

    The adapter a sync replaces stays loaded (and its folder on disk) until the next sync: a rollout
    that started before this sync (async prefetch) still finds the adapter it names. The server's two
    LoRA slots (``--max-loras 2``) hold both.

    Under several processes (identical weights after every step) only the ``leader`` saves, loads and
    unloads; ``share(name)`` is a collective that hands the leader's adapter name to every process, so
    the server holds one adapter per sync, not one per process. Every process calls ``sync`` at the
    same steps (the trainer calls it after each step), so the collective always matches.
    """

    def __init__(
        self,
        client: VLLMClient,
        *,
        sampling: Sampling,
        lora_name: str,
        adapter_dir: Path,
        sync_interval: int,
        base_model_name: str,
        max_concurrent: int = 32,
        leader: bool = True,
        share: Callable[[str], str] | None = None,
        fresh_adapter: bool = True,
    ):
        self.client = client
        self.fresh_adapter = fresh_adapter  # False for a warm start (lora_model_dir): not zero at step 0
        self.leader = leader
        self.share = share
        self.sampling = sampling
        self.lora_name = lora_name
        self.adapter_dir = Path(adapter_dir)
        self.sync_interval = sync_interval
        self.base_model_name = base_model_name
        self.max_concurrent = max_concurrent
        self._session = secrets.token_hex(3)
        self._loaded: list[tuple[str, Path | None]] = []  # (name, folder) on the server, oldest first
        self._started = False  # sync has been called (the first call is the start of training)
        self._synced_step: int | None = None

    @property
    def model_name(self) -> str:
        """The ``model`` that requests name: the latest adapter once one is loaded, else the base model."""
        return self._loaded[-1][0] if self._loaded else self.base_model_name

    def generate(
        self, prompts: list[list[int]], n: int, max_tokens: list[int], seeds: list[int]
    ) -> list[list[Completion]]:
        return sample(self.client, self.model_name, self.sampling, prompts, n, max_tokens, seeds, self.max_concurrent)

    def sync(self, model, step: int) -> None:
        """Load ``model``'s adapter (the unwrapped PEFT model) on the server when the schedule says so.

        Meant to be called after every optimizer step, and once before the first rollout with the step
        training starts from (0, or the resumed step). The first call loads the adapter unless the step
        is 0 and the adapter fresh: a fresh LoRA adapter is zero (B = 0), so the base model the server
        already serves *is* the policy, while a resumed or warm-started one is not zero and the server
        must get it whatever the interval. Later calls load it when ``step % sync_interval == 0``.
        """
        first, self._started = not self._started, True
        if (first and step == 0 and self.fresh_adapter) or (not first and step % self.sync_interval):
            return
        if not hasattr(model, "peft_config"):
            raise ConfigError("vLLM rollouts sync the policy as a LoRA adapter; set adapter: lora")
        if step == self._synced_step:
            return  # already synced after this step
        self._synced_step = step
        name = f"{self.lora_name}-{self._session}-step{step}"
        failure = None
        if self.leader:
            try:
                self._load(model, name, step)
            except EbftError as exc:
                failure = exc
                name = _FAILED + str(exc)
        if self.share is not None:
            name = self.share(name)  # the leader's name once its load is done (or why it failed)
            if not self.leader and not name.startswith(_FAILED):
                self._loaded = [*self._loaded[-1:], (name, None)]  # names only: the leader owns the folders
        if failure is not None:
            raise VLLMSyncError(f"could not load the adapter on the vLLM server: {failure}") from failure
        if name.startswith(_FAILED):  # every process stops, not only the one whose request failed
            raise VLLMSyncError(
                f"the main process could not sync the adapter to the vLLM server: {name[len(_FAILED) :]}"
            )
        log.debug("vLLM now generates with adapter %s", name)

    def _load(self, model, name: str, step: int) -> None:
        folder = self.adapter_dir / f"{self.lora_name}-step-{step:06d}"
        tmp = folder.with_name(folder.name + ".tmp")
        for stale in (tmp, folder):  # left by a crashed run at the same step
            if stale.exists():
                shutil.rmtree(stale)
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        # Written aside and renamed, so the server never reads a half-written adapter.
        os.replace(tmp, folder)
        try:
            self.client.load_lora_adapter(name, folder.resolve())
        except EbftError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._loaded.append((name, folder))
        while len(self._loaded) > 2:
            self._unload(*self._loaded.pop(0))

    def close(self) -> None:
        """Unload every adapter this backend loaded and delete their folders (and adapter_dir once empty)."""
        while self._loaded:
            name, folder = self._loaded.pop(0)
            if self.leader:
                self._unload(name, folder)
        with contextlib.suppress(OSError):  # absent, or still holding another process's adapters
            self.adapter_dir.rmdir()

    def _unload(self, name: str, folder: Path | None) -> None:
        # Logged, not raised: requests already use a newer adapter (or training is ending, maybe
        # because of another error that must not be hidden); a stale adapter only costs server memory.
        try:
            self.client.unload_lora_adapter(name)
        except EbftError as exc:
            log.warning("could not unload adapter %s from the vLLM server: %s", name, exc)
        if folder is not None:  # None: a name another process loaded, whose folder that process owns
            shutil.rmtree(folder, ignore_errors=True)

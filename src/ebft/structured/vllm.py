"""Rollouts from a vLLM server (``ebft vllm-serve CFG``) over its OpenAI-compatible HTTP API (DESIGN 6).

``VLLMClient`` speaks the few endpoints training needs (``/health``, ``/v1/completions``,
``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``) with the standard library only, so the
trainer needs no vLLM install: the server may run on another GPU or machine. ``VLLMBackend`` is the
``RolloutBackend`` on top of it; it keeps the server's policy current by saving the LoRA adapter and
hot-loading it (``trl.vllm_lora_sync: true``). Full-weight sync is ``ebft.structured.vllm_weights``;
``VLLMClient.request`` carries its control routes.

Facts about vLLM this relies on (checked against its sources; the ``vllm`` extra needs >= 0.10.2):

* ``/v1/completions`` with ``prompt`` a list of token-id lists answers ``n`` choices per prompt,
  prompt-major: the choices of prompt p carry ``index`` p*n .. p*n+n-1.
* With ``logprobs: 0`` and ``return_tokens_as_token_ids: true`` every generated token comes back as
  ``"token_id:123"`` in ``logprobs.tokens`` with its log-prob at the same place in
  ``logprobs.token_logprobs``. Those are the sampler's own log-probs (after repetition penalty,
  temperature, min-p, top-k, top-p) when the server runs with ``--logprobs-mode processed_logprobs``,
  as ``ebft vllm-serve`` starts it.
* A completion ended by a stop token id or EOS keeps that token in its token ids and log-probs; only
  the text drops it (``include_stop_str_in_output`` affects the text alone). So ``ids`` end with the
  stop token exactly as ``Completion`` wants, with nothing to append.
* An adapter name that is already loaded cannot be loaded again from a new path (400 "has already
  been loaded"; only recent versions have ``load_inplace``), so every sync loads under a new name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ebft.errors import ConfigError, EbftError, PolicySyncError
from ebft.structured.rollout import Completion, Sampling

log = logging.getLogger("ebft")

_TOKEN_PREFIX = "token_id:"
_HINT = (
    "start it with `ebft vllm-serve CFG` (same config) and check trl.vllm_server_host / trl.vllm_server_port "
    "(or the vllm: block's host / port)"
)


class VLLMError(EbftError):
    """The vLLM server cannot be reached, timed out, or refused a request (``status``: its 4xx code)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class VLLMSyncError(VLLMError, PolicySyncError):
    """The server could not be given the policy's current weights (the run stops; see the trainer)."""


class _Retryable(Exception):
    """A failure worth another attempt: no connection, a timeout, a 5xx."""


class VLLMClient:
    """A small client for vLLM's OpenAI-compatible server at ``host:port``.

    Every request waits at most ``timeout`` seconds. Connection failures, timeouts and 5xx answers
    are retried ``retries`` times, sleeping ``backoff``, 2*``backoff``, 4*``backoff``... in between;
    a 4xx answer is the request's fault and is reported at once with the server's message.
    """

    def __init__(self, host: str, port: int, *, timeout: float, retries: int = 3, backoff: float = 1.0):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.host, self.port = host, port
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.base_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"  # IPv6 in brackets
        # The server is addressed directly: an http_proxy set for the internet must not capture it.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def wait_until_ready(self, timeout: float, interval: float = 1.0) -> None:
        """Poll ``GET /health`` until it answers 200; VLLMError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._once("GET", "/health", None, max(0.1, min(self.timeout, deadline - time.monotonic())))
                return
            except (_Retryable, VLLMError) as exc:
                last = exc
            if time.monotonic() + interval > deadline:
                raise VLLMError(
                    f"no vLLM server is ready at {self.host}:{self.port} after {timeout:g}s "
                    f"(GET {self.base_url}/health: {last}); {_HINT}"
                )
            time.sleep(interval)

    def complete(
        self, prompts: list[list[int]], *, n: int, max_tokens: int, sampling: Sampling, seed: int, model: str
    ) -> list[list[Completion]]:
        """``n`` completions of each token-id prompt, at most ``max_tokens`` new tokens each, by ``model``
        (the served base model name or a loaded adapter's name). Returns P lists of n, in prompt order."""
        body = {
            "model": model,
            "prompt": prompts,
            "n": n,
            "max_tokens": max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "min_p": sampling.min_p,
            "repetition_penalty": sampling.repetition_penalty,
            "stop_token_ids": list(sampling.stop_token_ids),
            "seed": seed,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
        }
        answer = self._json("POST", "/v1/completions", body)
        try:
            choices = sorted(answer["choices"], key=lambda choice: choice["index"])
            if [c["index"] for c in choices] != list(range(len(prompts) * n)):
                raise ValueError(f"expected choices 0..{len(prompts) * n - 1}, got {[c['index'] for c in choices]}")
            done = [_completion(choice) for choice in choices]
        except (KeyError, TypeError, ValueError) as exc:
            raise VLLMError(f"unexpected answer from {self.base_url}/v1/completions: {exc}") from exc
        return [done[p * n : (p + 1) * n] for p in range(len(prompts))]

    def load_lora_adapter(self, name: str, path: str | Path) -> None:
        """Make the adapter saved in ``path`` (a folder the server can read) servable as ``name``."""
        self._send("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})

    def unload_lora_adapter(self, name: str) -> None:
        self._send("POST", "/v1/unload_lora_adapter", {"lora_name": name})

    def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        *,
        retries: int | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """One request to any route, as the class says; ``retries`` / ``timeout`` override the client's own."""
        return self._send(method, path, body, retries=retries, timeout=timeout)

    def _json(self, method: str, path: str, body: dict | None) -> dict:
        raw = self._send(method, path, body)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise VLLMError(f"{self.base_url}{path} answered something that is not JSON: {raw[:200]!r}") from exc

    def _send(
        self, method: str, path: str, body: dict | None, retries: int | None = None, timeout: float | None = None
    ) -> bytes:
        """One request, retried as the class says; the answer's body."""
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return self._once(method, path, body, self.timeout if timeout is None else timeout)
            except _Retryable as exc:
                last = exc
            if attempt < retries:
                time.sleep(self.backoff * 2**attempt)
        raise VLLMError(
            f"{method} {self.base_url}{path} failed after {retries + 1} attempt(s): {last}; "
            f"is the vLLM server up? {_HINT}"
        ) from last

    def _once(self, method: str, path: str, body: dict | None, timeout: float) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            message = _error_message(exc.read())
            if exc.code >= 500:
                raise _Retryable(f"HTTP {exc.code}: {message}") from exc
            refused = f"{method} {self.base_url}{path} was refused (HTTP {exc.code}): {message}"
            raise VLLMError(refused, status=exc.code) from exc
        except urllib.error.URLError as exc:
            raise _Retryable(_describe(exc.reason)) from exc
        except OSError as exc:  # timeouts and resets while reading the answer
            raise _Retryable(_describe(exc)) from exc


def _describe(reason) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    return str(reason) or type(reason).__name__


def _error_message(raw: bytes) -> str:
    """The message of a vLLM error body: ``{"error": {"message": ...}}`` (newer) or ``{"message": ...}``."""
    text = raw.decode(errors="replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:500] or "(no message)"
    if isinstance(payload, dict):
        inner = payload.get("error")
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])
        if "message" in payload:
            return str(payload["message"])
        if "detail" in payload:  # FastAPI's own validation errors
            return json.dumps(payload["detail"])[:500]
    return text[:500]


def _completion(choice: dict) -> Completion:
    reason = choice["finish_reason"]
    if reason not in ("stop", "length"):
        raise ValueError(f"choice {choice['index']} ended with finish_reason {reason!r}")
    logprobs = choice["logprobs"]
    tokens, values = logprobs["tokens"], logprobs["token_logprobs"]
    if len(tokens) != len(values):
        raise ValueError(f"choice {choice['index']} has {len(tokens)} tokens but {len(values)} log-probs")
    if not all(isinstance(t, str) and t.startswith(_TOKEN_PREFIX) for t in tokens):
        raise ValueError("tokens are not 'token_id:N' strings (return_tokens_as_token_ids ignored?)")
    ids = tuple(int(t[len(_TOKEN_PREFIX) :]) for t in tokens)
    return Completion(ids=ids, finished=reason == "stop", logprobs=tuple(float(v) for v in values))


def sample(
    client: VLLMClient,
    model: str,
    sampling: Sampling,
    prompts: list[list[int]],
    n: int,
    max_tokens: list[int],
    seeds: list[int],
    max_concurrent: int,
) -> list[list[Completion]]:
    """``RolloutBackend.generate`` on ``client``'s server with ``model`` (served name or adapter)."""
    # One request per prompt: a request has one seed and one max_tokens, and prompt i's samples
    # must depend on seeds[i] alone. The server batches the concurrent requests together anyway.
    jobs = list(zip(prompts, max_tokens, seeds, strict=True))

    def one(job: tuple[list[int], int, int]) -> list[Completion]:
        prompt, cap, seed = job
        (completions,) = client.complete([prompt], n=n, max_tokens=cap, sampling=sampling, seed=seed, model=model)
        return completions

    with ThreadPoolExecutor(max_workers=max(1, min(max_concurrent, len(jobs)))) as pool:
        return list(pool.map(one, jobs))


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

    def _unload(self, name: str, folder: Path) -> None:
        # Logged, not raised: requests already use a newer adapter (or training is ending, maybe
        # because of another error that must not be hidden); a stale adapter only costs server memory.
        try:
            self.client.unload_lora_adapter(name)
        except EbftError as exc:
            log.warning("could not unload adapter %s from the vLLM server: %s", name, exc)
        shutil.rmtree(folder, ignore_errors=True)


def vllm_backend(cfg, sampling: Sampling, gathered=None):
    """The backend training uses with ``trl.use_vllm``: the server of ``ebft vllm-serve`` (same config),
    waited for up to ``trl.vllm_server_timeout`` seconds, which is also each request's timeout.

    With ``trl.vllm_lora_sync`` the LoRA adapter is hot-loaded (this module); under a multi-process launch
    the main process syncs the (identical) adapter for all of them and broadcasts its name. Otherwise the
    full weights go through vLLM's weight transfer (``ebft.structured.vllm_weights``), gathered with
    ``gathered()`` when the policy is sharded.
    """
    from ebft.config import vllm_client_address
    from ebft.gguf_cache import local_model

    host, port = vllm_client_address(cfg)
    client = VLLMClient(host, port, timeout=cfg.trl.vllm_server_timeout)
    client.wait_until_ready(cfg.trl.vllm_server_timeout)
    if not cfg.trl.vllm_lora_sync:
        from ebft.structured.vllm_weights import weight_sync_backend

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

"""Rollouts from a vLLM server (``ebft vllm-serve CFG``) over its OpenAI-compatible HTTP API (docs/design.md §6).

``VLLMClient`` speaks the few endpoints training needs (``/health``, ``/v1/completions``,
``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``) with the standard library only, so the
trainer needs no vLLM install: the server may run on another GPU or machine. ``ebft.vllm.lora.VLLMBackend`` is the
``RolloutBackend`` on top of it; it keeps the server's policy current by saving the LoRA adapter and
hot-loading it (``trl.vllm_lora_sync: true``). Full-weight sync is ``ebft.vllm.weights``;
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

import json
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ebft.errors import EbftError, PolicySyncError
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

    def wait_until_ready(self, timeout: float, interval: float = 1.0, report_every: float | None = 10.0) -> None:
        """Poll ``GET /health`` until it answers 200; VLLMError after ``timeout`` seconds. While the server does
        not answer, a line names its address and the time left: when the wait starts and every
        ``report_every`` seconds (None: no lines); one more says when it answered."""
        started = time.monotonic()
        deadline = started + timeout
        report_at = started
        while True:
            try:
                self._once("GET", "/health", None, max(0.1, min(self.timeout, deadline - time.monotonic())))
                if report_at > started:  # it had to be waited for
                    log.info("vLLM server at %s is ready (after %.0f s)", self.base_url, time.monotonic() - started)
                return
            except (_Retryable, VLLMError) as exc:
                last = exc
            now = time.monotonic()
            if now + interval > deadline:
                raise VLLMError(
                    f"no vLLM server is ready at {self.host}:{self.port} after {timeout:g}s "
                    f"(GET {self.base_url}/health: {last}); {_HINT}"
                )
            if report_every is not None and now >= report_at:
                log.info(
                    "waiting for the vLLM server at %s (%s): %.0f s left; start it with `ebft vllm-serve CFG`",
                    self.base_url,
                    last,
                    deadline - now,
                )
                report_at = now + report_every
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

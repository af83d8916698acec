"""A stand-in for vLLM's OpenAI-compatible server, for tests on machines where vLLM cannot run.

``FakeVLLMServer(model_dir)`` serves the endpoints ebft uses, with vLLM's request fields, answer
shapes, status codes and error bodies: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``, and (``dev_mode``, as with
``VLLM_SERVER_DEV_MODE=1``) the weight-transfer routes of ``fake_weight_transfer.WeightReceiver``, which
load received weights into the served model, plus ``POST /reset_prefix_cache``. Completions are sampled by the real
causal LM in ``model_dir`` (or a PEFT adapter loaded on it, when ``model`` names one) the way vLLM's
sampler does it: repetition penalty, temperature, min-p, top-k, top-p, seeded draws, stop token ids
and the model's EOS, and the log-probs of the processed distribution (``--logprobs-mode
processed_logprobs``). Stop tokens stay in the token ids and log-probs and are dropped from the text.

It records every request, and has failure knobs: ``fail_next(k, status)``, ``delay`` (seconds before
each answer), and the receiver's. A completion requested while a weight update is open is refused
(409): no rollout may come from a half-updated server (vLLM itself would serve it). Use it as a context
manager; it listens on 127.0.0.1 at a free port.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from fake_weight_transfer import Refused, WeightReceiver

_SAMPLING_EPS = 1e-5  # vLLM samples greedily below this temperature
# The path of the completions endpoint, as requests to it are recorded.
COMPLETIONS = "/v1/completions"


@dataclass
class Recorded:
    """One request as the server saw it; ``answer`` is the JSON sent back (None for non-JSON answers)."""

    method: str
    path: str
    body: Any
    status: int = 0
    answer: Any = None


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass
class _Params:
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    as_token_ids: bool = False
    skip_special_tokens: bool = True


class FakeVLLMServer:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        served_model_name: str | None = None,
        dev_mode: bool = True,
        weight_transfer: bool = True,
        workers: int = 1,
    ):
        self.dev_mode, self._receiver_args = dev_mode, {"workers": workers, "configured": weight_transfer}
        self.model_dir = Path(model_dir)
        self.served_model_name = served_model_name or str(model_dir)
        self.requests: list[Recorded] = []
        self.delay = 0.0
        self.adapters: dict[str, tuple[str, Any]] = {}  # name -> (path, model)
        self._failures: list[tuple[int, str]] = []
        self._state = threading.Lock()
        self._compute = threading.Lock()  # one generation at a time: results never depend on thread timing
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> FakeVLLMServer:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self._pristine = {name: value.clone() for name, value in self.base.state_dict().items()}
        self.receiver = WeightReceiver(self.base, self._compute, **self._receiver_args)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-vllm", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    # -- knobs and records ---------------------------------------------------------------------

    def fail_next(self, k: int, status: int = 500, message: str = "injected failure") -> None:
        """Answer the next ``k`` requests (any endpoint) with ``status`` and a vLLM-style error body."""
        with self._state:
            self._failures += [(status, message)] * k

    def reset(self) -> None:
        """Forget requests, pending failures, the delay, every loaded adapter, the weight-transfer group and
        every transferred weight (between tests)."""
        with self._state:
            self.requests.clear()
            self._failures.clear()
            self.adapters.clear()
        self.delay = 0.0
        self.receiver.reset()
        with self._compute:
            self.base.load_state_dict(self._pristine)

    def calls(self, path: str) -> list[Recorded]:
        with self._state:
            return [r for r in self.requests if r.path == path]

    # -- request handling ----------------------------------------------------------------------

    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, Any]:
        """(status, answer): answer is a JSON-able object, a str (plain text) or None (empty body)."""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        path = path.partition("?")[0]
        record = Recorded(method, path, body)
        with self._state:
            self.requests.append(record)
            failure = self._failures.pop(0) if self._failures else None
        if self.delay:
            time.sleep(self.delay)
        if failure is not None:
            status, answer = failure[0], _error(failure[1], "InternalServerError", failure[0])
        else:
            try:
                status, answer = 200, self._route(method, path, body)
            except (_BadRequest, Refused) as exc:
                status, answer = exc.status, _error(str(exc), exc.kind, exc.status)
        record.status, record.answer = status, answer if isinstance(answer, dict) else None
        return status, answer

    def _route(self, method: str, path: str, body: Any) -> Any:
        routes = {
            ("GET", "/health"): lambda: None,
            ("GET", "/v1/models"): self._models,
            ("POST", COMPLETIONS): lambda: self._completions(_object(body)),
            ("POST", "/v1/load_lora_adapter"): lambda: self._load(_object(body)),
            ("POST", "/v1/unload_lora_adapter"): lambda: self._unload(_object(body)),
        }
        if self.dev_mode:
            r = self.receiver
            routes[("GET", "/get_world_size")] = r.world_size
            routes[("POST", "/init_weight_transfer_engine")] = lambda: r.init(body)
            routes[("POST", "/start_weight_update")] = r.start
            routes[("POST", "/update_weights")] = lambda: r.update(body)
            routes[("POST", "/finish_weight_update")] = lambda: r.finish(body)
            routes[("POST", "/reset_prefix_cache")] = lambda: None
        if (method, path) not in routes:
            raise _BadRequest(404, f"no route {method} {path}", "NotFoundError")
        return routes[method, path]()

    def _models(self) -> dict:
        cards = [{"id": self.served_model_name, "object": "model", "root": str(self.model_dir), "parent": None}]
        with self._state:
            cards += [
                {"id": name, "object": "model", "root": path, "parent": self.served_model_name}
                for name, (path, _) in self.adapters.items()
            ]
        return {"object": "list", "data": cards}

    def _load(self, body: dict) -> str:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            raise _BadRequest(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        with self._state:
            if name in self.adapters:
                raise _BadRequest(
                    400,
                    f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                    "place, set 'load_inplace' to True.",
                    "InvalidUserInput",
                )
        if not (Path(path) / "adapter_config.json").is_file():
            raise _BadRequest(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        from peft import PeftModel

        with self._compute:
            # Each adapter on its own copy of the base: PEFT injects its layers into the model it is given.
            model = PeftModel.from_pretrained(copy.deepcopy(self.base), path).eval()
        with self._state:
            self.adapters[name] = (str(path), model)
        return f"Success: LoRA adapter '{name}' added successfully."

    def _unload(self, body: dict) -> str:
        name = body.get("lora_name")
        if not name:
            raise _BadRequest(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
        with self._state:
            if name not in self.adapters:
                raise _BadRequest(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            del self.adapters[name]
        return f"Success: LoRA adapter '{name}' removed successfully."

    def _completions(self, body: dict) -> dict:
        if self.receiver.updating:
            raise _BadRequest(409, "a weight update is open: this completion would mix old and new weights")
        prompts, params = _prompts(body), _params(body)
        name = body.get("model") or self.served_model_name
        with self._state:
            if name == self.served_model_name:
                model = self.base
            elif name in self.adapters:
                model = self.adapters[name][1]
            else:
                raise _BadRequest(404, f"The model `{name}` does not exist.", "NotFoundError")
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        choices = []
        with self._compute, torch.no_grad():
            for prompt in prompts:
                for sample in self._sample(model, prompt, params, generator):
                    choices.append({"index": len(choices), **sample})
        generated = sum(len(c["logprobs"]["tokens"]) if c["logprobs"] else 0 for c in choices)
        prompt_tokens = sum(len(p) for p in prompts) * params.n
        return {
            "id": f"cmpl-fake-{len(self.requests)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": generated,
                "total_tokens": prompt_tokens + generated,
            },
        }

    # -- sampling ------------------------------------------------------------------------------

    def _sample(self, model, prompt: list[int], p: _Params, generator: torch.Generator) -> list[dict]:
        """``p.n`` completions of one prompt, generated side by side (rows keep going after they stop;
        their extra draws are discarded, which keeps the random stream independent of stopping)."""
        eos = model.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        ids = torch.tensor([prompt] * p.n, dtype=torch.long)
        out: list[list[tuple[int, float]]] = [[] for _ in range(p.n)]
        ended: list[tuple[str, int | None] | None] = [None] * p.n
        for _ in range(p.max_tokens):
            logits = model(input_ids=ids).logits[:, -1, :].float()
            logprobs = processed_logprobs(logits, ids, p)
            if p.temperature < _SAMPLING_EPS:
                token = logprobs.argmax(dim=-1)
            else:
                token = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
            chosen = logprobs.gather(-1, token[:, None]).squeeze(-1)
            for row in range(p.n):
                if ended[row] is not None:
                    continue
                t = int(token[row])
                out[row].append((t, max(float(chosen[row]), -9999.0)))  # vLLM's JSON-safe floor
                if t in p.stop_token_ids:
                    ended[row] = ("stop", t)
                elif t in eos_ids:
                    ended[row] = ("stop", None)
            if all(e is not None for e in ended):
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
        return [self._choice(tokens, end or ("length", None), p) for tokens, end in zip(out, ended, strict=True)]

    def _choice(self, tokens: list[tuple[int, float]], end: tuple[str, int | None], p: _Params) -> dict:
        ids = [t for t, _ in tokens]
        shown = ids[:-1] if end[0] == "stop" else ids  # the text drops the stop token, the ids keep it
        logprobs = None
        if p.logprobs is not None:
            names = [
                f"token_id:{t}" if p.as_token_ids else self.tokenizer.decode([t], skip_special_tokens=False)
                for t in ids
            ]
            logprobs = {
                "text_offset": [0] * len(ids),
                "token_logprobs": [lp for _, lp in tokens],
                "tokens": names,
                "top_logprobs": [{name: lp} for name, (_, lp) in zip(names, tokens, strict=True)],
            }
        return {
            "text": self.tokenizer.decode(shown, skip_special_tokens=p.skip_special_tokens),
            "logprobs": logprobs,
            "finish_reason": end[0],
            "stop_reason": end[1],
        }


def processed_logprobs(logits: torch.Tensor, history: torch.Tensor, p: _Params) -> torch.Tensor:
    """[n, V] log-probs of the distribution vLLM samples from, in its order: repetition penalty on
    every token seen (prompt and output), then (unless greedy) temperature, min-p, top-k, top-p."""
    logits = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, history, True)
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.temperature < _SAMPLING_EPS:
        return torch.log_softmax(logits, dim=-1)
    logits = logits / p.temperature
    if p.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    if 0 < p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        ordered, order = logits.sort(dim=-1)  # ascending: drop from the unlikely end
        drop = torch.softmax(ordered, dim=-1).cumsum(dim=-1) <= 1 - p.top_p
        drop[:, -1] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def _error(message: str, kind: str, status: int) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise _BadRequest(400, f"the request body must be a JSON object, got {str(body)[:80]!r}")
    return body


def _prompts(body: dict) -> list[list[int]]:
    prompts = body.get("prompt")
    ok = isinstance(prompts, list) and prompts and all(isinstance(p, list) and p for p in prompts)
    if not ok or not all(isinstance(t, int) and t >= 0 for p in prompts for t in p):
        raise _BadRequest(400, "prompt: this fake accepts only a non-empty list of non-empty token-id lists")
    return prompts


def _params(body: dict) -> _Params:
    def number(key: str, default, kind=float):
        value = body.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
            raise _BadRequest(400, f"{key}: expected a number, got {value!r}")
        return kind(value)

    params = _Params(
        n=number("n", 1, int),
        max_tokens=number("max_tokens", 16, int),
        temperature=number("temperature", 1.0),
        top_p=number("top_p", 1.0),
        top_k=number("top_k", 0, int),
        min_p=number("min_p", 0.0),
        repetition_penalty=number("repetition_penalty", 1.0),
        stop_token_ids=list(body.get("stop_token_ids") or []),
        seed=body.get("seed"),
        logprobs=body.get("logprobs"),
        as_token_ids=bool(body.get("return_tokens_as_token_ids")),
        skip_special_tokens=body.get("skip_special_tokens", True),
    )
    if params.n < 1 or params.max_tokens < 1:
        raise _BadRequest(400, "n and max_tokens must be >= 1")
    if not 0 < params.top_p <= 1:
        raise _BadRequest(400, f"top_p must be in (0, 1], got {params.top_p}")
    return params


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler still sleeping in `delay` must not hold up shutdown
    fake: FakeVLLMServer

    def handle_error(self, request, client_address) -> None:
        # A client that gave up (timeout tests) leaves the handler writing to a closed socket.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def _answer(self, method: str) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, answer = self.server.fake.handle(method, self.path, raw)
        if answer is None:
            data, kind = b"", "application/json"
        elif isinstance(answer, str):
            data, kind = answer.encode(), "text/plain; charset=utf-8"
        else:
            data, kind = json.dumps(answer).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        """Quiet: tests read ``FakeVLLMServer.requests`` instead of an access log."""

"""The weight-transfer side of FakeVLLMServer: vLLM's RLHF routes, with gloo standing in for NCCL.

``WeightReceiver(model)`` answers what a vLLM server started with ``VLLM_SERVER_DEV_MODE=1`` and
``--weight-transfer-config`` answers, with its request fields and error shapes:

* ``GET /get_world_size`` -> ``{"world_size": workers}``;
* ``POST /init_weight_transfer_engine {"init_info": {...}}``: each of ``workers`` worker threads joins
  the trainer's group as rank ``rank_offset + i`` (gloo, TCP rendezvous at ``master_address`` /
  ``master_port``), then takes part in the one-element warm-up all-reduce; answered once all have joined;
* ``POST /start_weight_update``, ``POST /update_weights {"update_info": {"names", "dtype_names",
  "shapes"}}`` (every worker receives each tensor by broadcast from rank 0, in order; the first worker loads
  each into ``model`` as it lands, as vLLM's ``load_weights`` does, and the others check they got the same
  bytes), ``POST /finish_weight_update {"weight_version"}``.

Without ``configured`` every one of those answers 500 with vLLM's "Weight transfer not configured"
message. Knobs: ``stall_join`` (answer init without joining: the trainer's rendezvous times out),
``fail_after(k)`` (the update request fails with a 500 after k more tensors, mid-transfer). Records:
``versions`` (finished weight versions), ``updates`` (the names each update request carried).
"""

from __future__ import annotations

import datetime
import threading

import torch

_TIMEOUT = datetime.timedelta(seconds=30)
NOT_CONFIGURED = "Weight transfer not configured. Please set weight_transfer_config to enable weight transfer."


class Refused(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.kind = status, kind


class WeightReceiver:
    def __init__(self, model: torch.nn.Module, lock: threading.Lock, *, workers: int = 1, configured: bool = True):
        self.model, self.lock, self.workers, self.configured = model, lock, workers, configured
        self.stall_join = False
        self.updating = False
        self.versions: list[str | None] = []
        self.updates: list[list[str]] = []
        self._groups: list = []
        self._fail_after: int | None = None

    def fail_after(self, k: int) -> None:
        self._fail_after = k

    def reset(self) -> None:
        self.stall_join, self.updating, self._fail_after = False, False, None
        self.versions.clear()
        self.updates.clear()
        self._groups = []

    # -- routes --------------------------------------------------------------------------------

    def world_size(self) -> dict:
        return {"world_size": self.workers}

    def init(self, body: dict) -> dict:
        info = self._configured(body, "init_info")
        if "nccl_unique_id_b64" in info:
            raise Refused(500, "this fake server speaks gloo (TCP rendezvous), not an NCCL unique id")
        try:
            host, port = info["master_address"], int(info["master_port"])
            offset, world = int(info["rank_offset"]), int(info["world_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise Refused(500, f"bad init_info {info!r}: {exc}") from exc
        if world != offset + self.workers:
            raise Refused(500, f"world_size {world} != rank_offset {offset} + {self.workers} workers")
        if info.get("packed"):
            raise Refused(500, "this fake receives unpacked broadcasts only")
        if self.stall_join:
            return {"message": "Weight transfer initialized"}
        groups = self._each_worker(lambda i: _join(host, port, offset + i, world))
        self._groups = groups
        return {"message": "Weight transfer initialized"}

    def start(self) -> dict:
        self._require_configured()
        if not self._groups:
            raise Refused(500, "NCCL weight transfer not initialized. Call init_transfer_engine() first.")
        self.updating = True
        return {"message": "Weight update started"}

    def update(self, body: dict) -> dict:
        info = self._configured(body, "update_info")
        if not self.updating:
            raise Refused(500, "update_weights outside start_weight_update ... finish_weight_update")
        names, dtypes, shapes = info.get("names"), info.get("dtype_names"), info.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
            raise Refused(500, "update_info needs the lists names, dtype_names and shapes")
        if not len(names) == len(dtypes) == len(shapes):
            raise Refused(500, f"`dtype_names` and `shapes` should be of the same size as `names`: {len(names)}")
        self.updates.append(list(names))
        params = dict(self.model.named_parameters())
        for name, dtype_name, shape in zip(names, dtypes, shapes, strict=True):
            dtype = getattr(torch, dtype_name, None)
            if not isinstance(dtype, torch.dtype):
                raise Refused(500, f"unknown dtype {dtype_name!r}")
            received = self._each_worker(lambda i, d=dtype, s=shape: _receive(self._groups[i], s, d))
            if any(not torch.equal(received[0], other) for other in received[1:]):
                raise Refused(500, f"{name}: the workers received different bytes")
            if self._fail_after is not None:
                if self._fail_after == 0:
                    raise Refused(500, f"injected failure while loading {name}")
                self._fail_after -= 1
            self._load(params, name, received[0])
        return {"message": "Weights updated"}

    def finish(self, body: dict) -> dict:
        self._require_configured()
        if not self.updating:
            raise Refused(500, "finish_weight_update without start_weight_update")
        self.updating = False
        self.versions.append((body or {}).get("weight_version"))
        return {"message": "Weight update finished"}

    # -- helpers -------------------------------------------------------------------------------

    def _require_configured(self) -> None:
        if not self.configured:
            raise Refused(500, NOT_CONFIGURED, "InternalServerError")

    def _configured(self, body, key: str) -> dict:
        self._require_configured()
        if not isinstance(body, dict) or not isinstance(body.get(key), dict):
            raise Refused(400, f"Missing '{key}' in request body")
        return body[key]

    def _each_worker(self, fn) -> list:
        """``fn(i)`` for every worker at once (a collective needs them all inside it together)."""
        results: list = [None] * self.workers
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                results[i] = fn(i)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(self.workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise Refused(500, f"{type(errors[0]).__name__}: {errors[0]}", "InternalServerError")
        return results

    def _load(self, params: dict, name: str, tensor: torch.Tensor) -> None:
        if name not in params:
            raise Refused(500, f"KeyError: '{name}' (no such weight in the served model)", "InternalServerError")
        param = params[name]
        if tuple(param.shape) != tuple(tensor.shape):
            raise Refused(500, f"{name}: shape {list(tensor.shape)} does not fit the served {list(param.shape)}")
        with self.lock, torch.no_grad():
            param.copy_(tensor)


def _join(host: str, port: int, rank: int, world: int):
    store = torch.distributed.TCPStore(host, port, world, is_master=False, timeout=_TIMEOUT)
    group = torch.distributed.ProcessGroupGloo(store, rank, world, _TIMEOUT)
    group.allreduce([torch.zeros(1, dtype=torch.float32)]).wait()
    return group


def _receive(group, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    buffer = torch.empty(shape, dtype=dtype)
    group.broadcast(buffer, 0).wait()
    return buffer

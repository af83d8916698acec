"""vLLM's weight-transfer protocol from the trainer's side (docs/design.md §6.6), without importing vLLM.

The server (``ebft vllm-serve`` with ``trl.vllm_lora_sync: false``: ``--weight-transfer-config
'{"backend": "nccl"}'`` and ``VLLM_SERVER_DEV_MODE=1``) exposes HTTP control routes; the tensors travel
over a process group of their own (``ebft.vllm.transport``), the trainer's main process being rank 0:

1. ``GET /get_world_size`` gives the server's worker count W; the group has 1 + W ranks.
2. ``POST /init_weight_transfer_engine {"init_info": {<rendezvous>, "rank_offset": 1, "world_size": 1 + W,
   "packed": false}}`` while the trainer joins the group: both sides meet in the rendezvous, then in a
   one-element warm-up all-reduce. Once per run.
3. Every sync: ``POST /start_weight_update``; per chunk of at most ``chunk_bytes``, ``POST /update_weights
   {"update_info": {"names", "dtype_names", "shapes"}}``, which the server answers once it has received
   each tensor it names, broadcast one by one in that order by the trainer meanwhile; ``POST
   /finish_weight_update {"weight_version": ...}``; ``POST /reset_prefix_cache``, so that no KV cache
   computed with the old weights is reused.

Between ``start`` and the end of the reset the server holds partly updated weights. A failure there
leaves :attr:`WeightTransfer.consistent` False for good and closes the group: nothing may sample from
that server again (restart it; a resumed run sends every weight anew).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from ebft.errors import EbftError
from ebft.vllm.client import VLLMClient, VLLMError
from ebft.vllm.transport import TransferError
from ebft.vllm.weight_source import Entry, plan_chunks

_START_HINT = (
    "start the server with `ebft vllm-serve CFG` and the same config: with trl.vllm_lora_sync: false it sets "
    'VLLM_SERVER_DEV_MODE=1 and --weight-transfer-config \'{"backend": "nccl"}\' (or sync LoRA adapters '
    "instead: trl.vllm_lora_sync: true with adapter: lora)"
)


class _Background:
    """``fn()`` on a daemon thread: a request that never returns must not keep the trainer alive."""

    def __init__(self, fn: Callable[[], Any]):
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._result = fn()
        except BaseException as exc:
            self._error = exc

    @property
    def error(self) -> BaseException | None:
        """The exception ``fn`` raised, if it has finished by now."""
        return None if self._thread.is_alive() else self._error

    def result(self, timeout: float) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TransferError(f"no answer within {timeout:g}s")
        if self._error is not None:
            raise self._error
        return self._result


class WeightTransfer:
    """Sends weights to ``client``'s server over the group ``make_transport(world_size)`` builds.

    timeout: seconds for the rendezvous, for each broadcast, and for each control request of a transfer.
    """

    def __init__(
        self,
        client: VLLMClient,
        make_transport: Callable[[int], Any],
        *,
        chunk_bytes: int,
        timeout: float,
    ):
        self.client, self.make_transport = client, make_transport
        self.chunk_bytes, self.timeout = chunk_bytes, timeout
        self.consistent = True  # False from a failed transfer on: the server's weights are a mix
        self._transport: Any | None = None  # what make_transport built, once connect() formed the group

    def connect(self) -> None:
        """Form the transfer group with the server (once; later calls do nothing)."""
        if self._transport is not None:
            return
        if not self.consistent:
            raise TransferError("a weight transfer to this vLLM server failed earlier; restart the server")
        try:
            answer = self.client.request("GET", "/get_world_size?include_dp=true")
        except VLLMError as exc:
            if exc.status == 404:
                raise TransferError(
                    f"the vLLM server at {self.client.base_url} has no weight-transfer routes (GET /get_world_size "
                    f"answered 404): it was not started for full-weight sync; {_START_HINT}"
                ) from exc
            raise
        workers = _world_size(answer)
        transport = self.make_transport(1 + workers)
        init_info = {**transport.start(), "rank_offset": 1, "world_size": 1 + workers, "packed": False}
        try:
            # The server answers once its workers have joined the group, which needs ours joining too
            # (already under way on the transport's own thread).
            try:
                self._control("/init_weight_transfer_engine", {"init_info": init_info})
            except VLLMError as exc:  # vLLM without --weight-transfer-config: "Weight transfer not configured"
                raise TransferError(
                    f"the vLLM server refused to set up weight transfer ({exc}); {_START_HINT}"
                ) from exc
            transport.joined()
        except EbftError:
            transport.close()
            raise
        self._transport = transport

    def push(self, entries: list[Entry], version: str) -> None:
        """Replace the server's weights named by ``entries`` (a whole update: start ... finish, reset)."""
        self.connect()
        chunks = plan_chunks([entry.nbytes for entry in entries], self.chunk_bytes)
        where = "start_weight_update"
        self.consistent = False
        try:
            self._control("/start_weight_update", {})
            for number, chunk in enumerate(chunks, 1):
                where = f"chunk {number}/{len(chunks)}"
                self._send_chunk([entries[i] for i in chunk])
            where = "finish_weight_update"
            self._control("/finish_weight_update", {"weight_version": version})
            where = "reset_prefix_cache"
            self.client.request("POST", "/reset_prefix_cache")
        except Exception as exc:
            self.close()
            cause = str(exc) if isinstance(exc, EbftError) else f"{type(exc).__name__}: {exc}"
            raise TransferError(
                f"the weight transfer to the vLLM server at {self.client.base_url} failed at {where}: {cause}. The "
                "server now holds partly updated weights and ebft will not sample from it; restart it"
            ) from exc
        self.consistent = True

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _send_chunk(self, entries: list[Entry]) -> None:
        specs = [spec for entry in entries for spec in entry.specs]
        tensors = [tensor for entry in entries for tensor in entry.tensors()]
        update_info = {
            "names": [spec.name for spec in specs],
            "dtype_names": [str(spec.dtype).removeprefix("torch.") for spec in specs],
            "shapes": [list(spec.shape) for spec in specs],
        }
        # The server receives while it handles this request: the request and the broadcasts run together.
        request = _Background(lambda: self._control("/update_weights", {"update_info": update_info}))
        transport = self._transport
        if transport is None:
            raise TransferError("no weight-transfer group: connect() first")
        device = transport.device
        for spec, tensor in zip(specs, tensors, strict=True):
            try:
                transport.broadcast(tensor.to(device))
            except TransferError as exc:
                refused = request.error  # the server's own account of what went wrong, when it gave one
                raise TransferError(f"{spec.name}: {refused if refused is not None else exc}") from exc
        request.result(self.timeout)

    def _control(self, path: str, body: dict) -> None:
        """A step of the protocol: never retried, since the server may have acted on it."""
        self.client.request("POST", path, body, retries=0, timeout=self.timeout)


def _world_size(answer: bytes) -> int:
    try:
        size = json.loads(answer)["world_size"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TransferError(f"GET /get_world_size answered {answer[:200]!r}, not {{'world_size': N}}") from exc
    if not isinstance(size, int) or size < 1:
        raise TransferError(f"GET /get_world_size answered world_size {size!r}")
    return size

"""The process group a full-weight sync travels over: trainer (rank 0) -> the vLLM server's workers
(docs/design.md §6.6).

The group is made for the transfer alone, apart from the group of the training processes: its ranks are
the trainer's main process (0) and the server's workers (1 .. world_size - 1).

* :class:`NcclTransport` is what vLLM speaks (``--weight-transfer-config '{"backend": "nccl"}'``), by its
  protocol for a trainer that does not import vLLM: the trainer builds a ``ProcessGroupNCCL`` over a private
  ``TCPStore``; the group's first collective, the one-element warm-up all-reduce that vLLM's workers also
  issue right after joining, mints the NCCL unique id, which ``ProcessGroupNCCL`` writes to store key "0"
  (a torch implementation detail, checked for its 128 bytes); the id reaches the server base64-encoded in
  ``init_info.nccl_unique_id_b64`` and the workers join with it. The trainer must be on a CUDA GPU.
* :class:`GlooTransport` takes the same steps over gloo on CPU with a TCP rendezvous (``init_info``'s
  ``master_address`` / ``master_port``). ebft's test server speaks it; vLLM does not.

Use: ``start()`` begins joining in the background and returns the rendezvous fields of ``init_info``;
``joined(timeout)`` waits until every rank has joined and the warm-up is done; ``broadcast(tensor)`` sends
one tensor to every worker; ``close()``. Every wait is bounded by the transport's ``timeout`` seconds.
"""

from __future__ import annotations

import base64
import datetime
import threading
import time

import torch

from ebft.errors import EbftError

# The size of an ncclUniqueId (NCCL_UNIQUE_ID_BYTES).
NCCL_UNIQUE_ID_BYTES = 128


class TransferError(EbftError):
    """The weight-transfer group could not be formed, or a broadcast over it failed."""


class _Transport:
    """What both transports share: a background join, and broadcasts that wait at most ``timeout``."""

    backend = ""

    def __init__(self, world_size: int, timeout: float, device: torch.device):
        if world_size < 2:
            raise ValueError(f"a weight transfer needs the trainer and at least one worker (world_size {world_size})")
        self.world_size, self.timeout, self.device = world_size, timeout, device
        self._pg = None  # the formed group (after the warm-up)
        self._forming = None  # the group while it forms, so that close() can abort a join still waiting
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def _group_timeout(self) -> datetime.timedelta:
        # The group's own limit (rendezvous store, collectives) outlasts the waits of joined() and
        # broadcast(), so that they, not the group, decide when to give up: their errors say what happened,
        # and for NCCL the watchdog would otherwise kill the trainer before it can save.
        return datetime.timedelta(seconds=2 * self.timeout + 30)

    def _group(self):
        raise NotImplementedError

    def _join(self) -> None:
        try:
            pg = self._forming = self._group()
            warm_up = torch.zeros(1, dtype=torch.float32, device=self.device)
            pg.allreduce([warm_up]).wait()
            self._pg = pg
        except BaseException as exc:  # reported by joined(), on the caller's thread
            self._error = exc

    def _start_join(self) -> threading.Thread:
        # A daemon: a server that never joins must not keep the trainer alive after it has given up.
        self._thread = threading.Thread(target=self._join, name=f"ebft-{self.backend}-join", daemon=True)
        self._thread.start()
        return self._thread

    def joined(self, timeout: float | None = None) -> None:
        """Wait until the server's workers have joined (and the warm-up all-reduce is done)."""
        if self._thread is None:
            raise TransferError("the weight-transfer group was never started (start() first)")
        wait = self.timeout if timeout is None else timeout
        self._thread.join(wait)
        if self._thread.is_alive():
            raise TransferError(
                f"the vLLM server's workers did not join the {self.backend} weight-transfer group within {wait:g}s "
                "(vllm.weight_transfer_timeout)"
            )
        if self._error is not None:
            raise TransferError(f"joining the {self.backend} weight-transfer group failed: {self._error}")

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Send ``tensor`` (on ``self.device``) from rank 0 to every worker."""
        if self._pg is None:
            raise TransferError("the weight-transfer group is not formed (or was closed after a failure)")
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = datetime.timedelta(seconds=self.timeout)
        try:
            self._pg.broadcast([tensor], opts).wait(datetime.timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise TransferError(f"broadcast over the {self.backend} weight-transfer group failed: {exc}") from exc

    def close(self) -> None:
        self._pg = self._forming = None


class GlooTransport(_Transport):
    """The transfer group over gloo with a TCP rendezvous at ``host`` (CPU; ebft's test server)."""

    backend = "gloo"

    def __init__(self, world_size: int, timeout: float, host: str = "127.0.0.1"):
        super().__init__(world_size, timeout, torch.device("cpu"))
        self.host = host
        self._store: torch.distributed.TCPStore | None = None

    def _group(self):
        return torch.distributed.ProcessGroupGloo(self._store, 0, self.world_size, self._group_timeout)

    def close(self) -> None:
        super().close()
        self._store = None  # the rendezvous store and its server thread go with the group

    def start(self) -> dict:
        store = self._store = torch.distributed.TCPStore(
            self.host,
            0,
            self.world_size,
            is_master=True,
            timeout=self._group_timeout,
            wait_for_workers=False,
        )
        self._start_join()
        return {"master_address": self.host, "master_port": store.port}


class NcclTransport(_Transport):
    """The transfer group over NCCL, rendezvous by unique id (vLLM's protocol for a trainer without vLLM)."""

    backend = "nccl"

    def __init__(self, world_size: int, timeout: float, device: torch.device):
        if device.type != "cuda" or not torch.distributed.is_nccl_available():
            raise TransferError(
                f"full-weight sync over NCCL needs the trainer on a CUDA GPU with NCCL (the main process is on "
                f"{device}); use trl.vllm_lora_sync: true with adapter: lora, or trl.use_vllm: false"
            )
        super().__init__(world_size, timeout, device)
        self._store: torch.distributed.TCPStore | None = None

    def _group(self):
        from torch.distributed import ProcessGroupNCCL

        torch.cuda.set_device(self.device)  # this runs on the join thread, which has its own current device
        options = ProcessGroupNCCL.Options()
        options._timeout = self._group_timeout
        return ProcessGroupNCCL(self._store, 0, self.world_size, options)

    def start(self) -> dict:
        # A store only this process uses: the workers get the unique id over HTTP, not from the store.
        store = self._store = torch.distributed.TCPStore(
            "127.0.0.1", 0, 1, is_master=True, timeout=datetime.timedelta(seconds=self.timeout)
        )
        thread = self._start_join()
        deadline = time.monotonic() + self.timeout
        while not store.check(["0"]):
            if not thread.is_alive():
                self.joined(0)  # raises why the group could not start
            if time.monotonic() > deadline:
                raise TransferError(
                    f"the NCCL group published no unique id (store key '0') within {self.timeout:g}s; this torch "
                    "version lays out ProcessGroupNCCL's rendezvous differently"
                )
            time.sleep(0.01)
        unique_id = store.get("0")
        if len(unique_id) != NCCL_UNIQUE_ID_BYTES:
            raise TransferError(
                f"store key '0' holds {len(unique_id)} bytes, not an NCCL unique id ({NCCL_UNIQUE_ID_BYTES}); "
                "this torch version lays out ProcessGroupNCCL's rendezvous differently"
            )
        # Standard (not URL-safe) base64, as vLLM decodes it.
        return {"nccl_unique_id_b64": base64.b64encode(unique_id).decode()}

    def close(self) -> None:
        pg = self._pg or self._forming
        self._pg = self._forming = None
        if pg is not None:
            pg.abort()  # frees the communicator even when a worker is gone, mid-join or mid-broadcast

"""The KV transport interface: the byte mover under the KV hand-off.

What moves and when (hold, reserve, pull, commit, the failure policy, the lease) is decided by the
hand-off, services/worker/kv_handoff.py. A `KVTransport` only moves bytes: a prefill worker `offer`s
a held request's KV views under a transfer id; a decode worker `pull`s them into the views it
reserved. The prefill side never pushes.

Both sides see a list of contiguous buffers (torch tensors; numpy arrays for the emulated engine) and
treat it as one byte stream: view sizes may differ between the two sides (different block ids make
different runs), only the total must match.

Implementations register in `TRANSPORTS` by name and are built with `create_transport(name, host)`
("auto": ucx where ucxx is installed, else tcp);
the services never import one directly, so a new transport (UCX) plugs in without touching them.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from shared.engine.api import KVView
from shared.tasks import cancel_all

log = logging.getLogger(__name__)


class TransferError(RuntimeError):
    """A pull failed: unknown transfer id, size mismatch, peer gone, timeout.

    `exposed`, where set, says whether bytes of the failed pull may still land in its destination
    (a receive the transport could not retire): until it returns False, that memory must not be reused.
    """

    def __init__(self, message: str, exposed: Callable[[], bool] | None = None) -> None:
        super().__init__(message)
        self.exposed = exposed


@dataclass(frozen=True)
class TransferStats:
    nbytes: int
    seconds: float
    transport: str

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Rows:
    """Part of an offered byte stream: the stream cut into rows of `size` bytes, bytes [offset, offset +
    length) of each row. A tensor-parallel rank pulls the KV heads it owns this way (shared/transfer/heads.py);
    the offering side copies them out (`select_rows`, into a `StagingPool` buffer) before sending."""

    size: int
    offset: int
    length: int

    def problem(self, views: Sequence[KVView]) -> str | None:
        """Why these rows cannot be cut from `views` (None: they can)."""
        if self.length <= 0 or self.offset < 0 or self.offset + self.length > self.size:
            return f"rows of {self.size} bytes have no bytes [{self.offset}, {self.offset + self.length})"
        if any(int(v.nbytes) % self.size for v in views):
            return f"the offered views are not whole rows of {self.size} bytes"
        return None

    def nbytes(self, total: int) -> int:
        return total // self.size * self.length


def select_rows(views: Sequence[KVView], rows: Rows, out: np.ndarray) -> np.ndarray:
    """The bytes `rows` selects from the views, in order, copied into the start of `out` (check
    `rows.problem` first); that part of `out`."""
    columns = slice(rows.offset, rows.offset + rows.length)
    start = 0
    for view in views:
        part = np.asarray(byte_view(view)).reshape(-1, rows.size)[:, columns]
        np.copyto(out[start:start + part.size].reshape(part.shape), part)
        start += part.size
    return out[:start]


class StagingPool:
    """Host buffers for the bytes `Rows` selects, reused once sent. A fresh buffer costs more than the copy
    into it: page faults, and UCX meeting memory it has not seen. A TP2 rank's rows of a 512-token prompt's
    KV (15.7 MB) took 24 ms over UCX shared memory from fresh buffers and 5.3 ms from reused ones
    (docs/performance.md, KV transfer)."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes  # kept between pulls; more may be out at once
        self._free: list[np.ndarray] = []

    def take(self, nbytes: int) -> np.ndarray:
        """A buffer of at least nbytes: the smallest free one that fits, else a new one."""
        fits = next((i for i, buffer in enumerate(self._free) if buffer.nbytes >= nbytes), None)  # sorted by size
        return np.empty(nbytes, dtype=np.uint8) if fits is None else self._free.pop(fits)

    def give(self, buffer: np.ndarray) -> None:
        """A taken buffer whose bytes are sent (nothing reads it any more)."""
        self._free.append(buffer)
        self._free.sort(key=lambda b: b.nbytes)
        while sum(b.nbytes for b in self._free) > self.max_bytes:
            self._free.pop(0)


class KVTransport(ABC):
    """Worker side of the KV hand-off. One per worker process, used from its event loop.

    Contract:
    * `start()` before anything else; `address` is then an opaque string that peers pass to
      `pull` (published in the worker's registration over NATS).
    * `offer(transfer_id, views)`: the views stay valid and unmodified until `withdraw` (the
      caller keeps the KV blocks). Offering an id twice replaces the offer.
    * `withdraw(transfer_id)`: no new pull of this id starts after it returns.
    * `pull(peer_address, transfer_id, dest, timeout, rows=None)`: fills `dest` (one byte stream) with
      the offered bytes, or with the `Rows` of them asked for, and returns when all of them are in
      `dest`; raises TransferError (also on timeout) and then `dest` holds undefined bytes.
      Concurrent pulls are allowed.
    * `close()` stops serving and drops every offer; safe to call twice.
    """

    name: ClassVar[str]

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._tasks: set[asyncio.Task[None]] = set()  # serving and accepting tasks, cancelled by close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_tasks(self) -> None:
        await cancel_all(list(self._tasks))

    @abstractmethod
    async def start(self) -> None: ...

    @property
    @abstractmethod
    def address(self) -> str: ...

    @abstractmethod
    def offer(self, transfer_id: str, views: Sequence[KVView]) -> None: ...

    @abstractmethod
    def withdraw(self, transfer_id: str) -> None: ...

    @abstractmethod
    async def pull(self, peer_address: str, transfer_id: str, dest: Sequence[KVView], timeout: float,
                   rows: Rows | None = None) -> TransferStats: ...

    @abstractmethod
    async def close(self) -> None: ...


# name -> "module:Class"; imported on first use so an optional transport costs nothing when unused.
TRANSPORTS: dict[str, str] = {
    "tcp": "shared.transfer.tcp:TcpTransport",
    "ucx": "shared.transfer.ucx:UcxTransport",
}


def create_transport(name: str, host: str = "127.0.0.1") -> KVTransport:
    """Build a transport by name; "auto" is ucx where ucxx imports, else tcp."""
    if name == "auto":
        try:
            transport = create_transport("ucx", host)
        except ValueError as exc:
            log.info("KV transport auto: ucx is not available (%s); using tcp", exc)
            return create_transport("tcp", host)
        log.info("KV transport auto: using ucx")
        return transport
    if name not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {name!r}; choose auto or one of {sorted(TRANSPORTS)}")
    module_name, class_name = TRANSPORTS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"KV transport {name!r} is not available here: {exc}") from exc
    cls: type[KVTransport] = getattr(module, class_name)
    return cls(host)


# -- byte-stream helpers shared by implementations ----------------------------------------------

def byte_view(view: KVView) -> memoryview:
    """A zero-copy, writable byte view of a contiguous CPU tensor or numpy array."""
    if isinstance(view, np.ndarray):
        if not view.flags.c_contiguous:
            raise ValueError("KV views must be contiguous")
        return memoryview(view).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer
    if not view.is_contiguous():
        raise ValueError("KV views must be contiguous")
    import torch  # loaded already: whoever made the tensor imported it

    flat = view.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer


def total_nbytes(views: Sequence[KVView]) -> int:
    return sum(int(v.nbytes) for v in views)


def chunks(views: Sequence[KVView], max_chunk: int) -> Iterator[memoryview]:
    """The byte stream of `views` as memoryviews of at most `max_chunk` bytes, in order."""
    for view in views:
        data = byte_view(view)
        for start in range(0, len(data), max_chunk):
            yield data[start:start + max_chunk]

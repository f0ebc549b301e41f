"""The KV hand-off's share of tensor-parallel ranks 1..tp-1: each offers and pulls its own KV heads.

Rank 0's worker runs the hand-off (services/worker/kv_handoff.py) and tells the other ranks their part
through commands (shared/engine/tp_group.py): offer this request's heads, pull that one's, forget one that
ended otherwise. Each of those ranks has a KV transport of its own, of the worker's kind, driven by an event
loop on a thread of its own, so its heads never pass through rank 0. A pulled request's heads wait in a
host buffer until rank 0 commits the import; the next forward command writes them into the blocks.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from shared.engine.api import KVImport
from shared.engine.model_runner import DTYPES, ModelRunner
from shared.protocol import KVHandle
from shared.transfer import TransferStats, create_transport
from shared.transfer.heads import pull_heads

T = TypeVar("T")
START_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 5.0

Report = Callable[[str, int, str | None], None]  # (request id, bytes pulled, error or None)


def report_to(fd: int) -> Report:
    """Reports to rank 0, one JSON line each, on the pipe it gave this rank."""
    pipe = os.fdopen(fd, "w", buffering=1)
    lock = threading.Lock()

    def report(request_id: str, nbytes: int, error: str | None) -> None:
        with lock:
            pipe.write(json.dumps({"request_id": request_id, "nbytes": nbytes, "error": error}) + "\n")

    return report


class RankHandoff:
    def __init__(self, runner: ModelRunner, transport: str, host: str, report: Report) -> None:
        self.runner = runner
        self.report = report
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="kv-transport").start()
        self.transport = create_transport(transport, host)
        self._run(self.transport.start()).result(START_TIMEOUT_S)
        self._lock = threading.Lock()
        self._pulling: set[str] = set()
        self._pulled: dict[str, torch.Tensor] = {}  # request id -> its heads, until the import is written

    def _run(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        """Call fn on the transport's loop (it is not thread-safe) and return once it has run."""
        async def call() -> None:
            fn()

        self._run(call()).result()

    @property
    def address(self) -> str:
        return self.transport.address

    def offer(self, request_id: str, block_ids: list[int]) -> None:
        """Offer this rank's heads of the blocks; returns once a pull may find them."""
        views = self.runner.kv_views(block_ids)
        if self.runner.device.type != "cpu":  # host-staged, as rank 0's (UCX's CUDA transports are not used yet)
            views = [view.cpu() for view in views]
        self._on_loop(lambda: self.transport.offer(request_id, views))

    def pull(self, kv: KVHandle, timeout: float) -> None:
        """Start pulling this rank's heads of the request's KV; reported to rank 0 when done."""
        dtype = DTYPES[kv.meta.dtype]
        heads = self.runner.kv_staging(kv.meta.num_blocks, dtype)
        with self._lock:
            self._pulling.add(kv.transfer_id)
        pulled = self._run(pull_heads(self.transport, kv, KVImport([heads], self.runner.kv_heads(dtype)), timeout))
        pulled.add_done_callback(lambda done: self._settle(kv.transfer_id, heads, done))

    def _settle(self, request_id: str, heads: torch.Tensor, done: Future[TransferStats]) -> None:
        error = done.exception()
        with self._lock:
            if request_id not in self._pulling:  # forgotten meanwhile
                return
            self._pulling.discard(request_id)
            if error is None:
                self._pulled[request_id] = heads
        self.report(request_id, done.result().nbytes if error is None else 0,
                    None if error is None else f"{type(error).__name__}: {error}")

    def take(self, request_id: str) -> torch.Tensor:
        """The pulled heads of a committed import (rank 0 commits only after every rank reported them)."""
        with self._lock:
            return self._pulled.pop(request_id)

    def forget(self, request_id: str) -> None:
        """Withdraw the request's offer, or drop its heads (pulled, or still coming)."""
        self._on_loop(lambda: self.transport.withdraw(request_id))
        with self._lock:
            self._pulling.discard(request_id)
            self._pulled.pop(request_id, None)

    def close(self) -> None:
        self._run(self.transport.close()).result(CLOSE_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)

"""The KV hand-off: how a request's KV cache moves from the prefill worker that computed it to the
decode worker that continues it. Both halves live here. Under them, the transports (shared/transfer)
only move bytes; the engine (`Engine.kv_export`, `kv_import_*`) only reads and writes its blocks.

The contract, in the order things happen:

Prefill side, `KVSender`
 1. The step that computes a prompt's last token also samples its first output token. Still on the
    engine thread, `export` takes the KV views of each such request; the engine keeps its blocks
    (status HELD).
 2. `offer` puts the views on the transport under the request id and returns the `KVHandle` that
    rides on the first token to the gateway, which forwards it to the decode worker it picks
    (a DecodeRequest). A tensor-parallel engine's other ranks offered their heads themselves, each on
    its own transport (shared/engine/tp_handoff.py); the handle says where (`shard_addresses`).
 3. The blocks are freed (`free`) by exactly one of: the decode worker's KVRelease (it has the
    bytes, or gave up on them), an abort of the request, or the lease (`worker.kv_lease_s`: whoever
    should have pulled them is gone).

Decode side, `KVReceiver`
 4. `submit`: a DecodeRequest joins a FCFS queue. Only its metadata is here: the bytes wait in
    prefill memory, so a burst backs up there, not here.
 5. The head of the queue is reserved (`kv_import_begin`) once the engine has room for it; nothing
    behind it starts first.
 6. Its bytes are pulled over the transport straight into the reserved blocks (the emulated engine
    moves a fraction of them and waits the modelled link time of the rest). Between tensor-parallel
    instances, each decode rank pulls the KV heads it owns from each prefill rank that has some
    (shared/transfer/heads.py): rank 0 here, the others on their own transports (`kv_import_ranks`).
 7. Pulled: `kv_import_commit` (it joins the decode batch), then KVRelease(pulled=True). Failed (peer
    gone, timeout, size mismatch): the failure policy `worker.kv_failure_policy` decides. `recompute`
    prefills the request here into the reserved blocks (the same continuation: a seeded sample
    depends only on the seed and the token's index); `fail` frees the reservation and the request
    ends with 502. Either way KVRelease(pulled=False). A pull that failed with bytes still on their
    way (`TransferError.exposed`: a link cut mid-transfer, then back) leaves its blocks set aside until
    nothing more can land in them; the recompute fills fresh ones. A migrated request whose tokens
    were decoded elsewhere (DecodeRequest.recompute: its decode worker died) pulls nothing: it is
    recomputed from the prompt and every token streamed so far, and no KVRelease is sent.
 8. An abort, at any point: queued, it leaves the queue; pulling, its reservation is freed when the
    pull returns; running, the engine frees it as any other request.

Each side reports to its worker (`WorkerPort`) and never touches NATS subscriptions, request state
or tracing itself: the decode side hands every outcome to the worker as an `Arrival`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from operator import methodcaller
from typing import Any, Literal, Protocol, TypeVar

from shared import protocol as p
from shared.config import WorkerSettings
from shared.engine import Engine, KVExport, KVMeta, StepOutput
from shared.engine.api import KVImport
from shared.transfer import KVTransport, TransferError, TransferStats
from shared.transfer.heads import pull_heads

log = logging.getLogger(__name__)

T = TypeVar("T")
RANKS_GRACE_S = 5.0  # beyond the pull timeout, how long to wait for a tensor-parallel engine's other ranks to report


class WorkerPort(Protocol):
    """What the hand-off needs of its worker (services/worker/base.py implements it)."""

    instance_id: str

    def engine_call(self, fn: Callable[[Engine], T]) -> asyncio.Future[T]: ...

    def spawn(self, coro: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> asyncio.Future[Any]: ...

    async def publish(self, subject: str, message: p.Message) -> None: ...

    def report_soon(self) -> None: ...


# -- prefill side ---------------------------------------------------------------------------------------

class KVSender:
    def __init__(self, worker: WorkerPort, transport: KVTransport, lease_s: float) -> None:
        self.worker = worker
        self.transport = transport
        self.lease_s = lease_s
        self.held: dict[str, float] = {}  # request id -> monotonic time its KV was offered

    @staticmethod
    def export(engine: Engine, outputs: list[StepOutput]) -> dict[str, KVExport]:
        """Step 1, on the engine thread right after the step (an abort may have freed one since: skipped)."""
        exports: dict[str, KVExport] = {}
        for out in outputs:
            if not out.finished:
                with contextlib.suppress(KeyError):
                    exports[out.request_id] = engine.kv_export(out.request_id)
        return exports

    def offer(self, export: KVExport) -> p.KVHandle:
        """Step 2: the KV waits on the transport; the handle tells a decode worker where."""
        request_id = export.meta.request_id
        self.transport.offer(request_id, export.views)
        self.held[request_id] = time.monotonic()
        return p.KVHandle(prefill_instance=self.worker.instance_id, transport=self.transport.name,
                          address=self.transport.address, transfer_id=request_id, nbytes=export.nbytes,
                          meta=export.meta, shard_addresses=export.shard_addresses)

    def holds(self, request_id: str) -> bool:
        return request_id in self.held

    def free(self, request_id: str) -> None:
        """Step 3 (release, abort or lease): no new pull starts, and the engine frees the blocks."""
        self.transport.withdraw(request_id)
        if self.held.pop(request_id, None) is not None:
            self.worker.spawn(self.worker.engine_call(methodcaller("abort", request_id)))
            self.worker.report_soon()

    async def run_lease(self) -> None:
        """Free KV nobody pulled within the lease (its gateway or decode worker is gone)."""
        while True:
            await asyncio.sleep(min(self.lease_s / 4, 5.0))
            now = time.monotonic()
            for request_id, since in list(self.held.items()):
                if now - since > self.lease_s:
                    log.warning("%s: KV of %s not pulled within %.0f s; freeing it", self.worker.instance_id,
                                request_id, self.lease_s)
                    self.free(request_id)


# -- decode side ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arrival:
    """How a request's KV reached (or did not reach) this decode worker."""

    request_id: str
    outcome: Literal["pulled", "recomputed", "failed"]
    started: float  # wall-clock time the pull started (0 if it never did)
    ended: float
    stats: TransferStats | None = None  # pulled
    error: str | None = None  # recomputed (why), failed (the error the request ends with)
    status: int = 0  # failed: the HTTP status to report


@dataclass
class _Incoming:
    request: p.DecodeRequest
    pulling: bool = False
    aborted: bool = False

    @property
    def meta(self) -> KVMeta:
        return self.request.kv.meta


class KVReceiver:
    def __init__(self, worker: WorkerPort, transport: KVTransport, settings: WorkerSettings,
                 on_arrival: Callable[[Arrival], Awaitable[None]],
                 modelled_s: Callable[[KVMeta], float] = lambda meta: 0.0) -> None:
        self.worker = worker
        self.transport = transport
        self.settings = settings
        self.on_arrival = on_arrival
        self.modelled_s = modelled_s  # link time a pull takes beyond its real bytes (the emulated engine's)
        self.incoming: dict[str, _Incoming] = {}  # queued or pulling
        self.queue: deque[str] = deque()  # FCFS, waiting for room
        self._room = asyncio.Event()

    def submit(self, request: p.DecodeRequest) -> None:
        """Step 4."""
        self.incoming[request.request_id] = _Incoming(request)
        self.queue.append(request.request_id)
        self._room.set()

    def room(self) -> None:
        """Something may have freed blocks (a request finished or was aborted): look at the queue again."""
        self._room.set()

    def waiting(self) -> list[KVMeta]:
        """Requests whose KV is not in the decode batch yet (queued or pulling), for the load report."""
        return [i.meta for i in self.incoming.values()]

    def cancel(self, request_id: str) -> bool:
        """Step 8 for a request not yet running here; False if it is not (running, or unknown)."""
        incoming = self.incoming.pop(request_id, None)
        if incoming is None:
            return False
        incoming.aborted = True  # queued: the reserve loop drops it; pulling: the pull frees its blocks
        self._room.set()
        return True

    async def run(self) -> None:
        """Step 5, forever: reserve blocks for the queue's head, FCFS, and start its pull."""
        while True:
            await self._room.wait()
            self._room.clear()
            while self.queue:
                metas = [self.incoming[rid].meta for rid in self.queue if rid in self.incoming]
                begun = await self.worker.engine_call(functools.partial(_reserve, metas=metas))
                for request_id, dest in begun:
                    self.queue.remove(request_id)
                    incoming = self.incoming.get(request_id)
                    if isinstance(dest, Exception):
                        if incoming is not None:
                            await self._settle(incoming, Arrival(request_id, "failed", 0.0, time.time(),
                                                                 error=str(dest), status=400))
                    elif incoming is None:  # aborted while its blocks were being reserved
                        self._drop(request_id)
                    elif incoming.request.recompute:
                        self.worker.spawn(self._recompute(incoming, time.time(), "migrated mid-decode"))
                    else:
                        incoming.pulling = True
                        self.worker.spawn(self._pull(incoming, dest))
                self.queue = deque(rid for rid in self.queue if rid in self.incoming)
                if len(begun) < len(metas):
                    break  # the head does not fit yet: wait for room

    async def _pull(self, incoming: _Incoming, dest: KVImport) -> None:
        """Steps 6 and 7."""
        request_id = incoming.request.request_id
        started = time.time()
        try:
            stats = await self._pull_heads(incoming.request.kv, dest)
        except TransferError as exc:
            await self._failed(incoming, started, exc)
            return
        modelled = self.modelled_s(incoming.meta)
        if modelled > 0:  # the emulated link: the bytes that did not move take this long
            await asyncio.sleep(modelled)
        if incoming.aborted:
            self._drop(request_id)
            return
        await self.worker.engine_call(methodcaller("kv_import_commit", request_id))
        if incoming.aborted:  # while committing: it is in the decode batch now, and leaves it
            self._drop(request_id)
            return
        await self._settle(incoming, Arrival(request_id, "pulled", started, time.time(), stats=stats))

    async def _pull_heads(self, kv: p.KVHandle, dest: KVImport) -> TransferStats:
        """The heads `dest` holds (all of them at tp 1) over the worker's transport; at tp > 1 the engine's
        other ranks pull theirs at the same time, each on its own transport."""
        timeout = self.settings.pull_timeout_s
        started = time.perf_counter()
        others = await self.worker.engine_call(methodcaller("kv_import_ranks", kv, timeout))
        if others is None:
            return await pull_heads(self.transport, kv, dest, timeout)
        results: tuple[TransferStats | BaseException, int | BaseException] = await asyncio.gather(
            pull_heads(self.transport, kv, dest, timeout),
            asyncio.wait_for(asyncio.wrap_future(others), timeout + RANKS_GRACE_S), return_exceptions=True)
        own, theirs = results
        for result in results:
            if isinstance(result, TimeoutError):
                raise TransferError(f"the engine's other ranks did not pull {kv.transfer_id!r} within {timeout} s")
            if isinstance(result, BaseException):
                raise result
        assert isinstance(own, TransferStats) and isinstance(theirs, int)
        return TransferStats(own.nbytes + theirs, time.perf_counter() - started, own.transport)

    async def _failed(self, incoming: _Incoming, started: float, exc: TransferError) -> None:
        request_id, policy = incoming.request.request_id, self.settings.kv_failure_policy
        log.warning("%s: KV pull of %s failed (%s); policy %s", self.worker.instance_id, request_id, exc, policy)
        if exc.exposed is not None:  # late bytes of the pull may still land in its blocks: never reuse them
            set_aside = await self.worker.engine_call(
                methodcaller("kv_import_set_aside", request_id))
            self.worker.spawn(self._free_when_settled(set_aside, exc.exposed))
        if incoming.aborted or policy == "fail":
            self._drop(request_id)
            if not incoming.aborted:
                await self._settle(incoming, Arrival(request_id, "failed", started, time.time(),
                                                     error=f"KV transfer failed: {exc}", status=502))
            return
        await self._recompute(incoming, started, str(exc))

    async def _recompute(self, incoming: _Incoming, started: float, reason: str) -> None:
        """Prefill the request's tokens here, into the blocks reserved for the KV that did not come."""
        request_id = incoming.request.request_id
        await self.worker.engine_call(methodcaller("kv_import_recompute", request_id))
        if incoming.aborted:
            self._drop(request_id)
            return
        await self._settle(incoming, Arrival(request_id, "recomputed", started, time.time(), error=reason))

    async def _free_when_settled(self, blocks: list[int], exposed: Callable[[], bool]) -> None:
        while exposed():
            await asyncio.sleep(0.5)
        await self.worker.engine_call(methodcaller("free_set_aside", blocks))
        self.room()
        self.worker.report_soon()

    async def _settle(self, incoming: _Incoming, arrival: Arrival) -> None:
        """The request leaves the hand-off: the prefill worker may free its copy; the worker takes over."""
        self.incoming.pop(arrival.request_id, None)
        kv = incoming.request.kv
        if not incoming.request.recompute:  # else no prefill worker holds a copy
            await self.worker.publish(p.Subjects.release(kv.prefill_instance),
                                      p.KVRelease(request_id=arrival.request_id, pulled=arrival.outcome == "pulled"))
        await self.on_arrival(arrival)

    def _drop(self, request_id: str) -> None:
        """An aborted or failed import: the engine frees its blocks, wherever it got to."""
        self.worker.spawn(self.worker.engine_call(methodcaller("abort", request_id)))
        self._room.set()


Reserved = tuple[str, KVImport | Exception]


def _reserve(engine: Engine, metas: list[KVMeta]) -> list[Reserved]:
    """On the engine thread: reserve blocks for the queue's head, FCFS, until one does not fit.

    A request the engine refuses outright (too long, another model's layout) comes back with its error."""
    begun: list[Reserved] = []
    for meta in metas:
        try:
            dest = engine.kv_import_begin(meta)
        except ValueError as exc:
            begun.append((meta.request_id, exc))
            continue
        if dest is None:
            break
        begun.append((meta.request_id, dest))
    return begun

"""Decode worker: pulls a request's KV only when it has room, then continues it in one decode batch.

Scheduler side of the KV hand-off (shared/transfer/base.py): requests wait here, FCFS, as small
DecodeRequest messages until `kv_import_begin` reserves blocks for them; only then are their bytes
pulled from the prefill worker (a burst waits in prefill memory, not here). After the pull the
import is committed, the prefill worker is told to free its copy, and the request joins continuous
batching; every step's tokens go to each gateway in one message.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from nats.aio.msg import Msg

from services.worker.base import Tracked, Worker
from services.worker.runner import StepResult
from shared import protocol as p
from shared.engine import KVMeta, LLMEngine
from shared.telemetry import extract_context
from shared.transfer import TransferError

log = logging.getLogger(__name__)

Phase = Literal["pending", "pulling", "running"]
Begun = tuple[str, list[torch.Tensor] | Exception]


@dataclass
class DecodeTracked(Tracked):
    request: p.DecodeRequest | None = None
    meta: KVMeta | None = None
    phase: Phase = "pending"
    transfer: p.TransferInfo | None = None  # rides on the request's first decode event
    decode_start: float = 0.0
    compute_s: float = 0.0  # time in the decode steps that produced its tokens (overhead attribution)
    aborted: bool = field(default=False)


class DecodeWorker(Worker):
    role = "decode"
    uses_transport = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: collections.deque[str] = collections.deque()  # FCFS, waiting for room to pull
        self._room = asyncio.Event()  # something may have freed blocks

    async def subscribe(self) -> None:
        assert self.nc is not None
        await self.nc.subscribe(p.Subjects.submit("decode", self.instance_id), cb=self._on_submit)
        self.spawn(self._pull_loop())

    def load(self) -> p.WorkerLoad:
        assert self.runner is not None
        s = self.runner.stats
        waiting = [t for t in self.requests.values() if t.phase != "running"]
        return p.WorkerLoad(queued_tokens=sum(t.meta.num_kv_tokens for t in waiting if t.meta),
                            waiting=len(waiting), running=s.num_running, held=0,
                            free_blocks=s.free_blocks, total_blocks=s.total_blocks)

    async def _on_submit(self, msg: Msg) -> None:
        req = self.parse(p.DecodeRequest, msg)
        if req is None:
            return
        tracked = DecodeTracked(req.request_id, req.reply_to, extract_context(msg.headers), time.time(), req,
                                req.kv.meta)
        self.requests[req.request_id] = tracked
        self.pending.append(req.request_id)
        self.state.update(req.request_id, decode_instance=self.instance_id)
        self._room.set()
        self.report_soon()

    # -- scheduler side: what to pull, and when ----------------------------------------------------------

    async def _pull_loop(self) -> None:
        while True:
            await self._room.wait()
            self._room.clear()
            while self.pending:
                heads = [self.requests[rid] for rid in self.pending if rid in self.requests]
                metas = [t.meta for t in heads if t.meta is not None]
                begun: list[Begun] = await self.engine_call(functools.partial(_begin_imports, metas=metas))
                for request_id, views in begun:
                    self.pending.remove(request_id)
                    tracked = self.requests.get(request_id)
                    if isinstance(views, Exception):
                        if tracked is not None:
                            await self._give_up(tracked, str(views), 400)
                    elif tracked is None:  # aborted while blocks were being reserved
                        abort = functools.partial(LLMEngine.kv_import_abort, request_id=request_id)
                        self.spawn(self.engine_call(abort))
                    else:
                        tracked.phase = "pulling"
                        self.spawn(self._pull(tracked, views))
                self.pending = collections.deque(rid for rid in self.pending if rid in self.requests)
                if len(begun) < len(metas):
                    break  # the head does not fit yet: wait for room

    async def _pull(self, tracked: DecodeTracked, views: list[torch.Tensor]) -> None:
        assert self.transport is not None and tracked.request is not None
        kv, rid = tracked.request.kv, tracked.request_id
        started = time.time()
        try:
            stats = await self.transport.pull(kv.address, kv.transfer_id, views,
                                              self.settings.worker.pull_timeout_s)
        except TransferError as exc:
            await self._transfer_failed(tracked, exc)
            return
        ended = time.time()
        if tracked.aborted:
            await self.engine_call(lambda e: e.kv_import_abort(rid))
            self._room.set()
            return
        await self.engine_call(lambda e: e.kv_import_commit(rid))
        tracked.phase = "running"
        tracked.decode_start = time.time()
        tracked.transfer = p.TransferInfo(nbytes=stats.nbytes, seconds=stats.seconds, transport=stats.transport)
        await self.publish(p.Subjects.release(kv.prefill_instance), p.KVRelease(request_id=rid))
        self.state.update(rid, kv_transfer_start=started, kv_transfer_end=ended, decode_start=tracked.decode_start,
                          kv_bytes=stats.nbytes, kv_transfer_ms=round(stats.seconds * 1e3, 3),
                          kv_transport=stats.transport)
        self.tracing.record("decode queue", tracked.received, started, tracked.trace, {"instance": self.instance_id})
        self.tracing.record("kv transfer", started, ended, tracked.trace,
                            {"bytes": stats.nbytes, "transport": stats.transport, "from": kv.prefill_instance})
        self.report_soon()

    async def _transfer_failed(self, tracked: DecodeTracked, exc: TransferError) -> None:
        """Per the policy: recompute the prefill here (its blocks are reserved already), or fail it."""
        assert tracked.request is not None
        rid, policy = tracked.request_id, self.settings.worker.kv_failure_policy
        log.warning("%s: KV pull of %s failed (%s); policy %s", self.instance_id, rid, exc, policy)
        if tracked.aborted or policy == "fail":
            await self.engine_call(lambda e: e.kv_import_abort(rid))
            self._room.set()
            if not tracked.aborted:
                await self._give_up(tracked, f"KV transfer failed: {exc}", 502)
            return
        await self.engine_call(lambda e: e.kv_import_recompute(rid))
        tracked.phase = "running"
        tracked.decode_start = time.time()
        await self.publish(p.Subjects.release(tracked.request.kv.prefill_instance),
                           p.KVRelease(request_id=rid, pulled=False))
        self.state.update(rid, decode_start=tracked.decode_start, kv_recomputed=1, kv_error=str(exc))
        self.report_soon()

    async def _give_up(self, tracked: DecodeTracked, message: str, status: int) -> None:
        """Fail a request that never joined the batch; the prefill worker may free its KV."""
        self.requests.pop(tracked.request_id, None)
        if tracked.request is not None:
            await self.publish(p.Subjects.release(tracked.request.kv.prefill_instance),
                               p.KVRelease(request_id=tracked.request_id, pulled=False))
        await self.send_error(tracked.reply_to, tracked.request_id, message, status)

    # -- decoding --------------------------------------------------------------------------------------

    async def handle_step(self, result: StepResult[Any]) -> None:
        events: list[tuple[str, p.TokenEvent]] = []
        for out in result.outputs:
            tracked: DecodeTracked | None = self.requests.get(out.request_id)
            if tracked is None:
                continue
            events.append((tracked.reply_to, self.event(out, transfer=tracked.transfer)))
            tracked.transfer = None
            tracked.compute_s += result.ended - result.started
            if out.finished:
                self.requests.pop(out.request_id, None)
                self.state.update(out.request_id, decode_compute_s=round(tracked.compute_s, 6))
                self.tracing.record("decode", tracked.decode_start, result.ended, tracked.trace,
                                    {"instance": self.instance_id, "output_tokens": out.num_output_tokens})
                self._room.set()
        await self.send_events(events)

    async def on_abort(self, request_id: str) -> None:
        tracked: DecodeTracked | None = self.requests.pop(request_id, None)
        if tracked is None:
            return
        tracked.aborted = True
        if tracked.phase == "running":
            await self.engine_call(lambda e: e.abort(request_id))
        # pending: dropped from the queue by the pull loop; pulling: the pull task frees the blocks
        self._room.set()
        self.report_soon()


def _begin_imports(engine: LLMEngine, metas: list[KVMeta]) -> list[Begun]:
    """On the engine thread: reserve blocks for the queue's head, FCFS, until one does not fit."""
    begun: list[Begun] = []
    for meta in metas:
        try:
            views = engine.kv_import_begin(meta)
        except ValueError as exc:
            begun.append((meta.request_id, exc))
            continue
        if views is None:
            break
        begun.append((meta.request_id, views))
    return begun

"""Decode worker: pulls a request's KV only when it has room, then continues it in one decode batch.

The receiving half of the KV hand-off is services/worker/kv_handoff.py (`KVReceiver`): requests wait
there, FCFS, as small DecodeRequest messages until the engine reserves blocks for them; only then
are their bytes pulled from the prefill worker. This module is what happens around it: requests
arrive, join continuous batching once their KV is in, and every step's tokens go to each gateway in
one message.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from operator import methodcaller
from typing import Any

from nats.aio.msg import Msg

from services.worker.base import Tracked, Worker
from services.worker.cli import add_worker_command
from services.worker.kv_handoff import Arrival, KVReceiver
from services.worker.runner import StepResult
from shared import protocol as p
from shared.telemetry import extract_context


@dataclass
class DecodeTracked(Tracked):
    prefill_instance: str = ""
    transfer: p.TransferInfo | None = None  # rides on the request's first decode event
    decode_start: float = 0.0
    compute_s: float = 0.0  # time in the decode steps that produced its tokens (overhead attribution)


class DecodeWorker(Worker):
    role = "decode"
    kv: KVReceiver

    async def start(self) -> list[Coroutine[Any, Any, None]]:
        assert self.engine is not None
        self.kv = KVReceiver(self, self.kv_transport(), self.settings.worker, self._arrived,
                             modelled_s=self.engine.modelled_transfer_s)
        return [self.kv.run()]

    def load(self) -> p.WorkerLoad:
        assert self.runner is not None
        s = self.runner.stats
        waiting = self.kv.waiting()
        return p.WorkerLoad(queued_tokens=sum(meta.num_kv_tokens for meta in waiting), waiting=len(waiting),
                            running=s.num_running, held=0, free_blocks=s.free_blocks, total_blocks=s.total_blocks)

    async def on_submit(self, msg: Msg) -> None:
        req = self.parse(p.DecodeRequest, msg)
        if req is None or self.duplicate(req.request_id):
            return
        self.requests[req.request_id] = DecodeTracked(req.request_id, req.reply_to, extract_context(msg.headers),
                                                      time.time(), prefill_instance=req.kv.prefill_instance)
        self.state.update(req.request_id, decode_instance=self.instance_id)
        self.kv.submit(req)
        self.report_soon()

    async def _arrived(self, arrival: Arrival) -> None:
        """The hand-off of one request ended: it decodes here now, or it failed."""
        tracked: DecodeTracked | None = self.requests.get(arrival.request_id)
        if tracked is None:
            return
        rid = arrival.request_id
        if arrival.outcome == "failed":
            self.requests.pop(rid, None)
            await self.send_error(tracked.reply_to, rid, arrival.error or "KV hand-off failed", arrival.status)
            return
        tracked.decode_start = time.time()
        if arrival.stats is not None:  # pulled
            stats = arrival.stats
            tracked.transfer = p.TransferInfo(nbytes=stats.nbytes, seconds=stats.seconds, transport=stats.transport)
            self.state.update(rid, kv_transfer_start=arrival.started, kv_transfer_end=arrival.ended,
                              decode_start=tracked.decode_start, kv_bytes=stats.nbytes,
                              kv_transfer_ms=round(stats.seconds * 1e3, 3), kv_transport=stats.transport)
            self.tracing.record("decode queue", tracked.received, arrival.started, tracked.trace,
                                {"instance": self.instance_id})
            self.tracing.record("kv transfer", arrival.started, arrival.ended, tracked.trace,
                                {"bytes": stats.nbytes, "transport": stats.transport, "from": tracked.prefill_instance})
        else:  # recomputed
            self.state.update(rid, decode_start=tracked.decode_start, kv_recomputed=1, kv_error=arrival.error or "")
        self.report_soon()

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
                self.kv.room()
        await self.send_events(events)

    async def on_abort(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is None:
            return
        if not self.kv.cancel(request_id):  # it is in the decode batch
            await self.engine_call(methodcaller("abort", request_id))
            self.kv.room()
        self.report_soon()


def register(subparsers: argparse._SubParsersAction) -> None:
    add_worker_command(subparsers, DecodeWorker, "run a decode worker")

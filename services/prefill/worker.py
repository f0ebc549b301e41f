"""Prefill worker: FCFS prompt batches under a token budget; first token out, KV held until pulled.

Its KV pool is the buffer between the phases: a request's blocks stay here, offered on the KV
transport, until a decode worker has pulled them (services/worker/kv_handoff.py, `KVSender`). When
the pool is full the engine takes no new prefills (back-pressure); requests wait in its queue, none
is dropped.
"""

from __future__ import annotations

import argparse
from collections.abc import Coroutine
from typing import Any

from nats.aio.msg import Msg

from services.worker.base import Worker
from services.worker.cli import add_worker_command
from services.worker.kv_handoff import KVSender
from services.worker.runner import StepResult
from shared import protocol as p
from shared.engine import KVExport, StepOutput


class PrefillWorker(Worker):
    role = "prefill"
    kv: KVSender

    async def start(self) -> list[Coroutine[Any, Any, None]]:
        assert self.nc is not None
        self.kv = KVSender(self, self.kv_transport(), self.settings.worker.kv_lease_s)
        await self.nc.subscribe(p.Subjects.release(self.instance_id), cb=self._on_release)
        return [self.kv.run_lease()]

    def post_step(self, outputs: list[StepOutput]) -> dict[str, KVExport]:
        assert self.engine is not None
        return KVSender.export(self.engine, outputs)

    async def handle_step(self, result: StepResult[Any]) -> None:
        exports: dict[str, KVExport] = result.extra or {}
        events: list[tuple[str, p.TokenEvent]] = []
        served = []
        for out in result.outputs:
            tracked = self.requests.pop(out.request_id, None)  # its prefill is done: the KV is the sender's now
            if tracked is None:  # aborted meanwhile: the engine freed (or frees) its KV
                continue
            served.append((out, tracked))
            export = exports.get(out.request_id)
            handle = self.kv.offer(export) if export is not None and not out.finished else None
            events.append((tracked.reply_to, self.event(out, kv=handle)))
        await self.send_events(events)  # the first tokens leave before the bookkeeping below
        for out, tracked in served:
            self.record_prefill(out, tracked, result, batch_size=len(result.outputs))

    def serves(self, request_id: str) -> bool:
        return super().serves(request_id) or self.kv.holds(request_id)

    def serving(self) -> list[str]:
        # Held KV too: the request is here until its KV is pulled (or, if its first token was lost on
        # the way to the gateway, until the lease frees it).
        return [*self.requests, *self.kv.held]

    async def on_abort(self, request_id: str) -> None:
        if self.kv.holds(request_id):
            self.kv.free(request_id)
        else:
            await super().on_abort(request_id)

    async def _on_release(self, msg: Msg) -> None:
        release = self.parse(p.KVRelease, msg)
        if release is not None:
            self.kv.free(release.request_id)


def register(subparsers: argparse._SubParsersAction) -> None:
    add_worker_command(subparsers, PrefillWorker, "run a prefill worker")

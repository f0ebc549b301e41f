"""Prefill worker: FCFS prompt batches under a token budget; first token out, KV held until pulled.

Its KV pool is the buffer between the phases: a request's blocks stay here, offered on the KV
transport, until a decode worker pulled them and says so (KVRelease). When the pool is full the
engine takes no new prefills (back-pressure); requests wait in its queue, none is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg

from services.worker.base import Tracked, Worker
from services.worker.runner import StepResult
from shared import protocol as p
from shared.engine import KVExport, StepOutput
from shared.telemetry import extract_context

log = logging.getLogger(__name__)


@dataclass
class PrefillTracked(Tracked):
    held_since: float = 0.0  # monotonic time the KV started waiting for a pull; 0 while queued


class PrefillWorker(Worker):
    role = "prefill"
    uses_transport = True

    async def subscribe(self) -> None:
        assert self.nc is not None
        await self.nc.subscribe(p.Subjects.submit("prefill", self.instance_id), cb=self._on_submit)
        await self.nc.subscribe(p.Subjects.release(self.instance_id), cb=self._on_release)
        self.spawn(self._lease_loop())

    def load(self) -> p.WorkerLoad:
        assert self.runner is not None
        s = self.runner.stats
        return p.WorkerLoad(queued_tokens=s.queued_prompt_tokens, waiting=s.num_waiting, running=s.num_running,
                            held=s.num_held, free_blocks=s.free_blocks, total_blocks=s.total_blocks)

    async def _on_submit(self, msg: Msg) -> None:
        req = self.parse(p.PrefillRequest, msg)
        if req is None:
            return
        now = time.time()
        self.state.update(req.request_id, queued=now, prefill_instance=self.instance_id)
        self.admit(req, PrefillTracked(req.request_id, req.reply_to, extract_context(msg.headers), now))

    def post_step(self, outputs: list[StepOutput]) -> dict[str, KVExport]:
        # On the engine thread, right after the step: export while the request is held (an abort may
        # have freed it since; then it has no export and handle_step skips it).
        assert self.engine is not None
        exports: dict[str, KVExport] = {}
        for out in outputs:
            if not out.finished:
                with contextlib.suppress(KeyError):  # aborted during the step
                    exports[out.request_id] = self.engine.kv_export(out.request_id)
        return exports

    async def handle_step(self, result: StepResult[Any]) -> None:
        assert self.transport is not None
        exports: dict[str, KVExport] = result.extra or {}
        events: list[tuple[str, p.TokenEvent]] = []
        served: list[tuple[StepOutput, PrefillTracked]] = []
        for out in result.outputs:
            tracked: PrefillTracked | None = self.requests.get(out.request_id)
            if tracked is None:  # aborted meanwhile: the engine freed (or frees) its KV
                continue
            served.append((out, tracked))
            export = exports.get(out.request_id)
            if out.finished or export is None:
                self.requests.pop(out.request_id, None)
                events.append((tracked.reply_to, self.event(out)))
                continue
            self.transport.offer(out.request_id, export.views)
            tracked.held_since = time.monotonic()
            handle = p.KVHandle(prefill_instance=self.instance_id, transport=self.transport.name,
                                address=self.transport.address, transfer_id=out.request_id, nbytes=export.nbytes,
                                meta=export.meta)
            events.append((tracked.reply_to, self.event(out, kv=handle)))
        await self.send_events(events)  # the first tokens leave before the bookkeeping below
        for out, tracked in served:
            self.state.update(out.request_id, prefill_start=result.started, prefill_end=result.ended)
            self.tracing.record("prefill queue", tracked.received, result.started, tracked.trace)
            self.tracing.record("prefill compute", result.started, result.ended, tracked.trace,
                                {"instance": self.instance_id, "prompt_tokens": out.num_prompt_tokens,
                                 "batch_size": len(result.outputs)})

    async def _on_release(self, msg: Msg) -> None:
        release = self.parse(p.KVRelease, msg)
        if release is None:
            return
        self._free(release.request_id)

    def _free(self, request_id: str) -> None:
        assert self.transport is not None
        self.transport.withdraw(request_id)
        if self.requests.pop(request_id, None) is not None:
            self.spawn(self.engine_call(lambda e: e.abort(request_id)))
            self.report_soon()

    async def on_abort(self, request_id: str) -> None:
        self._free(request_id)

    async def _lease_loop(self) -> None:
        """Free KV nobody pulled within the lease (its gateway or decode worker is gone)."""
        lease = self.settings.worker.kv_lease_s
        while True:
            await asyncio.sleep(min(lease / 4, 5.0))
            now = time.monotonic()
            for request_id, tracked in list(self.requests.items()):
                if tracked.held_since and now - tracked.held_since > lease:
                    log.warning("%s: KV of %s not pulled within %.0f s; freeing it", self.instance_id,
                                request_id, lease)
                    self._free(request_id)

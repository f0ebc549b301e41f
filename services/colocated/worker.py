"""Colocated worker: prefill and decode on the same engine with continuous batching.

The baseline of the goodput comparison: vLLM's policy (a step runs pending prefills first, else the
decode batch), or with `chunked_prefill` Sarathi-Serve's (decodes plus prefill chunks up to the
token budget in every step). Same gateway, protocol and engine as the disaggregated stack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg

from services.worker.base import Tracked, Worker
from services.worker.runner import StepResult
from shared import protocol as p
from shared.telemetry import extract_context


@dataclass
class ColocatedTracked(Tracked):
    first_token_at: float = 0.0


class ColocatedWorker(Worker):
    role = "colocated"

    async def subscribe(self) -> None:
        assert self.nc is not None
        await self.nc.subscribe(p.Subjects.submit("colocated", self.instance_id), cb=self._on_submit)

    def load(self) -> p.WorkerLoad:
        assert self.runner is not None
        s = self.runner.stats
        return p.WorkerLoad(queued_tokens=s.queued_prompt_tokens, waiting=s.num_waiting, running=s.num_running,
                            free_blocks=s.free_blocks, total_blocks=s.total_blocks)

    async def _on_submit(self, msg: Msg) -> None:
        req = self.parse(p.PrefillRequest, msg)
        if req is None:
            return
        now = time.time()
        self.state.update(req.request_id, queued=now, prefill_instance=self.instance_id,
                          decode_instance=self.instance_id)
        self.admit(req, ColocatedTracked(req.request_id, req.reply_to, extract_context(msg.headers), now))

    async def handle_step(self, result: StepResult[Any]) -> None:
        events: list[tuple[str, p.TokenEvent]] = []
        for out in result.outputs:
            tracked: ColocatedTracked | None = self.requests.get(out.request_id)
            if tracked is None:
                continue
            if not tracked.first_token_at:  # this step finished its prefill
                tracked.first_token_at = result.ended
                self.state.update(out.request_id, prefill_start=result.started, prefill_end=result.ended,
                                  decode_start=result.ended)
                self.tracing.record("prefill queue", tracked.received, result.started, tracked.trace)
                self.tracing.record("prefill compute", result.started, result.ended, tracked.trace,
                                    {"instance": self.instance_id, "prompt_tokens": out.num_prompt_tokens})
            events.append((tracked.reply_to, self.event(out)))
            if out.finished:
                self.requests.pop(out.request_id, None)
                self.tracing.record("decode", tracked.first_token_at, result.ended, tracked.trace,
                                    {"instance": self.instance_id, "output_tokens": out.num_output_tokens})
        await self.send_events(events)

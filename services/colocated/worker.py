"""Colocated worker: prefill and decode on the same engine with continuous batching.

The baseline of the goodput comparison: vLLM's policy (a step runs pending prefills first, else the
decode batch), or with `chunked_prefill` Sarathi-Serve's (decodes plus prefill chunks up to the
token budget in every step). Same gateway, protocol and engine as the disaggregated stack.
"""

from __future__ import annotations

import argparse
from typing import Any

from services.worker.base import Worker
from services.worker.cli import add_worker_command
from services.worker.runner import StepResult
from shared import protocol as p


class ColocatedWorker(Worker):
    role = "colocated"

    async def handle_step(self, result: StepResult[Any]) -> None:
        events: list[tuple[str, p.TokenEvent]] = []
        for out in result.outputs:
            tracked = self.requests.get(out.request_id)
            if tracked is None:
                continue
            if not tracked.first_token_at:  # this step finished its prefill
                tracked.first_token_at = result.ended
                self.record_prefill(out, tracked, result)
                self.state.update(out.request_id, decode_start=result.ended)
            events.append((tracked.reply_to, self.event(out)))
            if out.finished:
                self.requests.pop(out.request_id, None)
                self.tracing.record("decode", tracked.first_token_at, result.ended, tracked.trace,
                                    {"instance": self.instance_id, "output_tokens": out.num_output_tokens})
        await self.send_events(events)


def register(subparsers: argparse._SubParsersAction) -> None:
    add_worker_command(subparsers, ColocatedWorker, "run a colocated (prefill + decode) worker: the baseline",
                       chunked_prefill=True)

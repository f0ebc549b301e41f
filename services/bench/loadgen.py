"""The open-loop load generator: each request fires at its scheduled time, whatever is in flight.

A run is bounded twice: by its requests and by a time limit. At the limit, requests still
streaming are cancelled and recorded as "cancelled at the time limit", and requests not yet sent
as "not sent", so a run always ends and every scheduled request has a record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import httpx

from services.bench.client import ClientConfig, Timing, stream_request
from services.bench.metrics import RequestRecord
from shared.workloads import WorkloadRequest

CANCELLED = "cancelled at the time limit"
NOT_SENT = "not sent: the time limit came first"

# Called after each request ends: (request index, its record).
OnDone = Callable[[int, RequestRecord], None]


@dataclass(frozen=True)
class Run:
    rate: float
    requests: Sequence[WorkloadRequest]
    arrivals: Sequence[float]  # send times, seconds from the start of the run
    time_limit_s: float

    def __post_init__(self) -> None:
        if len(self.requests) != len(self.arrivals):
            raise ValueError(f"{len(self.requests)} requests but {len(self.arrivals)} arrival times")
        if not self.time_limit_s > 0:
            raise ValueError(f"time limit must be positive, got {self.time_limit_s}")


async def run_load(http: httpx.AsyncClient, config: ClientConfig, run: Run, on_done: OnDone | None = None
                   ) -> list[RequestRecord]:
    """Send ``run``'s requests open-loop; one record per request, in request order."""
    start = time.perf_counter()
    deadline = start + run.time_limit_s
    records: list[RequestRecord | None] = [None] * len(run.requests)

    async def one(i: int) -> None:
        request = run.requests[i]
        sent = time.perf_counter()
        try:
            timing = await stream_request(http, config, request.prompt, request.output_tokens)
        except asyncio.CancelledError:
            records[i] = _record(run, i, start, Timing(sent=sent, error=CANCELLED))
            raise
        record = records[i] = _record(run, i, start, timing)
        if on_done is not None:
            on_done(i, record)

    tasks: list[asyncio.Task[None]] = []
    for i, at in enumerate(run.arrivals):
        delay = start + at - time.perf_counter()
        if start + at >= deadline:
            break
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return [r if r is not None else _record(run, i, start, None) for i, r in enumerate(records)]


def _record(run: Run, i: int, start: float, timing: Timing | None) -> RequestRecord:
    """The record of request i; ``timing`` None means it was never sent."""
    request = run.requests[i]
    base = RequestRecord(
        index=i,
        rate=run.rate,
        scheduled_s=run.arrivals[i],
        input_tokens=request.input_tokens,
        expected_output_tokens=request.output_tokens,
        error=NOT_SENT,
    )
    if timing is None:
        return base

    def relative(t: float | None) -> float | None:
        return None if t is None else t - start

    return replace(
        base,
        error=timing.error,
        sent_s=relative(timing.sent),
        first_token_s=relative(timing.first_token),
        end_s=relative(timing.end),
        output_tokens=timing.output_tokens,
        prompt_tokens=timing.usage_prompt_tokens,
    )

"""The gateway's side of the control plane: send requests to workers, route their tokens back.

One `Dispatcher` per gateway process. It keeps the worker registry fresh from heartbeats, sends a
new request to the prefill (or colocated) instance with the least queued work, and when the first
token arrives with a KV handle, hands the request to the least-loaded decode instance. Tokens
from any worker land in this gateway's inbox and are routed to the request's `InFlight` queue,
which the HTTP handler drains. A request whose worker dies or stops answering ends with an error;
none is left waiting forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry import trace

from services.gateway.errors import APIError
from services.gateway.metrics import GatewayMetrics
from services.gateway.registry import Registry
from shared import protocol as p
from shared.config import Settings
from shared.state import RequestFields, StateWriter
from shared.tasks import cancel_all
from shared.telemetry import Tracing, end_span, inject_headers, span_context

log = logging.getLogger(__name__)

_PRUNE_INTERVAL_S = 0.25


@dataclass
class InFlight:
    """One admitted request, from dispatch to its last token."""

    request_id: str
    prompt_tokens: int
    arrived: float
    span: trace.Span
    instance: str = ""  # the worker that serves it now
    first_token_at: float = 0.0
    finished_at: float = 0.0
    output_tokens: int = 0
    finish_reason: str | None = None
    events: asyncio.Queue[p.TokenEvent] = field(default_factory=asyncio.Queue)
    done: bool = False
    deadline: asyncio.TimerHandle | None = None  # fails the request when request_timeout_s is up


class Dispatcher:
    def __init__(self, settings: Settings, nc: NATS, state: StateWriter, tracing: Tracing,
                 metrics: GatewayMetrics, registry: Registry, model_name: str) -> None:
        self.settings = settings
        self.model_name = model_name
        self.gateway_id = f"gateway-{uuid.uuid4().hex[:8]}"
        self.inbox = p.Subjects.tokens(self.gateway_id)
        self.nc = nc
        self.state = state
        self.tracing = tracing
        self.metrics = metrics
        self.registry = registry
        self.inflight: dict[str, InFlight] = {}
        self._prune_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.nc.subscribe(p.Subjects.heartbeat, cb=self._on_heartbeat)
        await self.nc.subscribe(p.Subjects.bye, cb=self._on_bye)
        await self.nc.subscribe(self.inbox, cb=self._on_tokens)
        self._prune_task = asyncio.create_task(self._prune_loop(), name="prune-workers")

    async def close(self) -> None:
        await cancel_all([self._prune_task])
        for flight in list(self.inflight.values()):
            self._fail(flight, 503, "the gateway is shutting down")

    @property
    def pending(self) -> int:
        """Admitted requests still waiting for their first token (the admission queue)."""
        return sum(1 for f in self.inflight.values() if not f.first_token_at)

    # -- submitting ---------------------------------------------------------------------------------

    async def submit(self, prompt_token_ids: list[int], sampling: p.SamplingParams, kind: str) -> InFlight:
        """Admit and dispatch a validated request, or raise APIError (503 no workers, 429 full)."""
        role = self.registry.entry_role()
        if role is None:
            raise APIError(503, "no live workers: the service is starting or its workers are down",
                           code="no_workers")
        if self.pending >= self.settings.gateway.max_pending:
            retry = str(self.settings.gateway.retry_after_s)
            raise APIError(429, "too many requests are waiting for their first token; retry later",
                           code="queue_full", headers={"Retry-After": retry})
        worker = self.registry.pick(role, len(prompt_token_ids))
        assert worker is not None  # entry_role saw one alive
        now = time.time()
        request_id = f"{kind}-{uuid.uuid4().hex}"
        span = self.tracing.start("gateway", now, attributes={"request_id": request_id, "kind": kind,
                                                               "prompt_tokens": len(prompt_token_ids)})
        flight = InFlight(request_id, len(prompt_token_ids), now, span, instance=worker.instance_id)
        self.inflight[request_id] = flight
        flight.deadline = asyncio.get_running_loop().call_later(
            self.settings.gateway.request_timeout_s, self._fail, flight, 504, "request timed out")
        self.metrics.inflight.inc()
        self.metrics.pending.set(self.pending)
        self.metrics.prompt_tokens.inc(len(prompt_token_ids))
        self.state.update(request_id, status="queued", arrived=now, model=self.model_name,
                          prompt_tokens=len(prompt_token_ids), max_tokens=sampling.max_tokens)
        message = p.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_token_ids, sampling=sampling,
                                   reply_to=self.inbox, arrived_at=now)
        # Queued in the NATS client now, not from a task a loop iteration later: its flush is the
        # next thing the loop runs (the Redis state write waits for its coalescing window).
        await self._publish(p.Subjects.submit(role, worker.instance_id), message, flight)
        return flight

    async def _publish(self, subject: str, message: p.Message, flight: InFlight | None = None) -> None:
        headers = inject_headers(span_context(flight.span)) if flight is not None and self.tracing.enabled else None
        try:
            await self.nc.publish(subject, message.encode(), headers=headers)
        except Exception as exc:  # NATS down: the request cannot proceed
            log.warning("publish to %s failed: %s", subject, exc)
            if flight is not None:
                self._fail(flight, 503, f"control plane unavailable: {exc}")

    async def stream(self, flight: InFlight) -> AsyncGenerator[p.TokenEvent, None]:
        """The request's token events until it finishes; APIError if it fails or times out.

        Leaving early (the client went away) aborts the request on every worker.
        """
        try:
            while True:
                event = await flight.events.get()  # the deadline timer ends a request that takes too long
                if event.error is not None:
                    raise APIError(event.status if event.status >= 400 else 500, event.error)
                yield event
                if event.finished:
                    return
        finally:
            if not flight.done:
                self.abort(flight, "client disconnected")

    def abort(self, flight: InFlight, reason: str) -> None:
        """The client left: free the request's KV wherever it is, and count it."""
        self._finish(flight, "aborted", error=reason)
        asyncio.ensure_future(self._publish(p.Subjects.abort, p.AbortRequest(request_id=flight.request_id,
                                                                             reason=reason)))

    # -- worker messages ----------------------------------------------------------------------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            info = p.decode(p.WorkerInfo, msg.data)
        except ValueError:
            return
        known = self.registry.instances.get(info.instance_id)
        if self.registry.update(info):
            if known is None:
                log.info("worker %s (%s) joined", info.instance_id, info.role)
            else:  # a new process under a known id: what the old one served is gone with it
                log.warning("worker %s (%s) restarted", info.instance_id, info.role)
                self._fail_served_by({info.instance_id})

    async def _on_bye(self, msg: Msg) -> None:
        try:
            bye = p.decode(p.WorkerBye, msg.data)
        except ValueError:
            return
        if self.registry.remove(bye.instance_id) is not None:
            log.info("worker %s left", bye.instance_id)
            self._fail_served_by({bye.instance_id})

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(_PRUNE_INTERVAL_S)
            dead = self.registry.prune()
            for inst in dead:
                log.warning("worker %s (%s) stopped reporting; dropped", inst.instance_id, inst.role)
            if dead:
                self._fail_served_by({i.instance_id for i in dead})

    def _fail_served_by(self, instances: set[str]) -> None:
        for flight in list(self.inflight.values()):
            if flight.instance in instances:
                self._fail(flight, 503, f"worker {flight.instance} is gone")

    async def _on_tokens(self, msg: Msg) -> None:
        try:
            batch = p.decode(p.TokenBatch, msg.data)
        except ValueError:
            log.warning("malformed token batch dropped")
            return
        now = time.time()
        for event in batch.events:
            flight = self.inflight.get(event.request_id)
            if flight is None or flight.done:
                if event.kv is not None:  # its KV waits for a pull nobody will make: free it (a no-op where
                    # the request's own abort got there first)
                    await self._publish(p.Subjects.abort, p.AbortRequest(request_id=event.request_id,
                                                                         reason="the request ended at its gateway"))
                continue
            self._on_event(flight, event, now)

    def _on_event(self, flight: InFlight, event: p.TokenEvent, now: float) -> None:
        if event.error is not None:
            self._fail(flight, event.status, event.error)
            return
        if not flight.first_token_at:
            flight.first_token_at = now
            self.metrics.pending.set(self.pending)
            self.metrics.ttft.observe(now - flight.arrived)
            self.state.update(flight.request_id, first_token=now, status="prefilled")
        if event.transfer is not None:
            transport = event.transfer.transport
            self.metrics.kv_transfer.labels(transport=transport).observe(event.transfer.seconds)
            self.metrics.kv_bytes.labels(transport=transport).inc(event.transfer.nbytes)
            self.state.update(flight.request_id, status="decoding")
        flight.output_tokens = event.num_output_tokens
        if event.kv is not None and not event.finished:
            self._hand_to_decode(flight, event.kv)
        flight.events.put_nowait(event)
        if event.finished:
            flight.finish_reason = event.finish_reason
            self._finish(flight, "ok")

    def _hand_to_decode(self, flight: InFlight, kv: p.KVHandle) -> None:
        worker = self.registry.pick("decode")
        if worker is None:  # the abort that _fail sends frees the KV the prefill worker holds
            self._fail(flight, 503, "no live decode worker to continue the request")
            return
        flight.instance = worker.instance_id
        message = p.DecodeRequest(request_id=flight.request_id, reply_to=self.inbox, kv=kv)
        publish = self._publish(p.Subjects.submit("decode", worker.instance_id), message, flight)
        # Its task starts on the next loop turn, after the handler that this first token wakes (the
        # caller queues the token next): the token is written to the client before this is encoded
        # and flushed (about 0.1 ms sooner here), and the decode worker gets it a moment later.
        asyncio.get_running_loop().call_soon(asyncio.ensure_future, publish)

    # -- endings ------------------------------------------------------------------------------------

    def _fail(self, flight: InFlight, status: int, message: str) -> None:
        """End a request with an error; every worker frees what it still holds of it (e.g. a dead
        decode worker's request leaves its KV held on the prefill side)."""
        if flight.done:
            return
        flight.events.put_nowait(p.TokenEvent(request_id=flight.request_id, finished=True, error=message,
                                              status=status))
        self._finish(flight, "error", error=message)
        asyncio.ensure_future(self._publish(p.Subjects.abort, p.AbortRequest(request_id=flight.request_id,
                                                                             reason=message)))

    def _finish(self, flight: InFlight, outcome: str, error: str | None = None) -> None:
        if flight.done:
            return
        flight.done = True
        flight.finished_at = now = time.time()
        if flight.deadline is not None:
            flight.deadline.cancel()
        self.inflight.pop(flight.request_id, None)
        m = self.metrics
        m.inflight.dec()
        m.pending.set(self.pending)
        m.requests.labels(outcome=outcome).inc()
        fields: RequestFields = {"finish": now, "output_tokens": flight.output_tokens}
        if outcome == "ok":
            m.output_tokens.inc(flight.output_tokens)
            m.e2e.observe(now - flight.arrived)
            ttft = flight.first_token_at - flight.arrived
            tpot = self.tpot(flight)
            if tpot is not None:
                m.tpot.observe(tpot)
            slo = self.settings.gateway
            if ttft <= slo.slo_ttft_s and (tpot is None or tpot <= slo.slo_tpot_s):
                m.slo_attained.inc()
            fields |= {"status": "finished", "finish_reason": flight.finish_reason or ""}
        else:
            fields |= {"status": "aborted" if outcome == "aborted" else "failed", "error": error or ""}
        self.state.update(flight.request_id, **fields)
        end_span(flight.span, now, error if outcome == "error" else None)

    @staticmethod
    def tpot(flight: InFlight) -> float | None:
        """(e2e - TTFT) / (output tokens - 1): None for a request with a single output token."""
        if flight.output_tokens < 2 or not flight.first_token_at:
            return None
        return (flight.finished_at - flight.first_token_at) / (flight.output_tokens - 1)

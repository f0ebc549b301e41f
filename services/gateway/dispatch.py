"""The gateway's side of the control plane: send requests to workers, route their tokens back.

One `Dispatcher` per gateway process. It keeps the worker registry fresh from heartbeats, sends a
new request to the prefill (or colocated) instance with the least queued work, and when the first
token arrives with a KV handle, hands the request to the least-loaded decode instance. Tokens
from any worker land in this gateway's inbox and are routed to the request's `InFlight` queue,
which the HTTP handler drains.

A request whose worker dies, stops reporting, restarts or gives it up (shutting down) migrates: the
gateway keeps every token it streamed, and continues the request on another worker of the phase it
was in. A prefill goes to another prefill worker; a decode goes to another decode worker, which
pulls the KV again if no token was decoded yet (a prefill worker still holds it), else recomputes it
from the prompt and the tokens streamed so far. Sampling is a function of the seed and the token's
index, so the client sees one uninterrupted stream. NATS delivers at most once, and a server that
dies takes the messages it held with it: a request its worker does not list in two heartbeats in a
row (`WorkerInfo.serving`: the submit never arrived, or its last token was lost) migrates, and so does
one whose tokens show a gap in their index.
Past `migration_limit`, or with no worker of the phase within `migration_wait_s`, the request ends
with a 503; none is left waiting forever.

While this gateway's own NATS connection is down, the workers' silence is its own link's: nobody is
pruned, and requests wait for the connection (the clients buffer what they publish) until
`nats_outage_s`, when they end with a 503.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry import trace

from services.gateway.errors import APIError, retry_later
from services.gateway.metrics import GatewayMetrics
from services.gateway.registry import Instance, Registry
from shared import protocol as p
from shared.config import Settings
from shared.state import RequestFields, StateWriter
from shared.tasks import cancel_all
from shared.telemetry import Tracing, end_span, inject_headers, span_context

log = logging.getLogger(__name__)

_PRUNE_INTERVAL_S = 0.25
NO_WORKERS = "no live workers: the service is starting or its workers are down"


@dataclass
class InFlight:
    """One admitted request, from dispatch to its last token."""

    request: p.PrefillRequest  # as first dispatched
    role: p.Role  # where it entered: prefill or colocated
    span: trace.Span
    instance: str = ""  # the worker that serves it now ("" while it migrates): only its events count
    assigned_at: float = 0.0  # wall-clock time it was sent to `instance` (compared with the worker's reports)
    unlisted: int = 0  # heartbeats of `instance` in a row that did not list it
    kv: p.KVHandle | None = None  # from the prefill worker's first token: where the KV waits
    output_token_ids: list[int] = field(default_factory=list)  # streamed so far (what a migration resumes)
    emitted_chars: int = 0
    migrations: int = 0
    first_token_at: float = 0.0
    last_token_at: float = 0.0  # when the latest token arrived (inter-token latency)
    finished_at: float = 0.0
    output_tokens: int = 0
    finish_reason: str | None = None
    events: asyncio.Queue[p.TokenEvent] = field(default_factory=asyncio.Queue)
    done: bool = False
    deadline: asyncio.TimerHandle | None = None  # fails the request when request_timeout_s is up

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def arrived(self) -> float:
        return self.request.arrived_at


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
        self._nats_down_since: float | None = None  # monotonic

    async def start(self) -> None:
        await self.nc.subscribe(p.Subjects.heartbeat, cb=self._on_heartbeat)
        await self.nc.subscribe(p.Subjects.bye, cb=self._on_bye)
        await self.nc.subscribe(p.Subjects.scaling, cb=self._on_scaling)
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
        retry_s = self.settings.gateway.retry_after_s
        if role is None:
            raise retry_later(503, NO_WORKERS, retry_s, code="no_workers")
        if self._nats_outage_over_bound():
            raise retry_later(503, self._nats_outage_message(), retry_s, code="control_plane_unavailable")
        if self.pending >= self.settings.gateway.max_pending:
            raise retry_later(429, "too many requests are waiting for their first token; retry later", retry_s,
                              code="queue_full")
        worker = self.registry.pick(role, len(prompt_token_ids))
        assert worker is not None  # entry_role saw one alive
        now = time.time()
        request_id = f"{kind}-{uuid.uuid4().hex}"
        span = self.tracing.start("gateway", now, attributes={"request_id": request_id, "kind": kind,
                                                               "prompt_tokens": len(prompt_token_ids)})
        message = p.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_token_ids, sampling=sampling,
                                   reply_to=self.inbox, arrived_at=now)
        flight = InFlight(message, role, span, instance=worker.instance_id, assigned_at=now)
        self.inflight[request_id] = flight
        flight.deadline = asyncio.get_running_loop().call_later(
            self.settings.gateway.request_timeout_s, self._fail, flight, 504, "request timed out")
        self.metrics.inflight.inc()
        self.metrics.pending.set(self.pending)
        self.metrics.prompt_tokens.inc(len(prompt_token_ids))
        self.state.update(request_id, status="queued", arrived=now, model=self.model_name,
                          prompt_tokens=len(prompt_token_ids), max_tokens=sampling.max_tokens)
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
                    status = event.status if event.status >= 400 else 500
                    if status in (429, 503):  # overload or no worker left: worth a retry, later
                        raise retry_later(status, event.error, self.settings.gateway.retry_after_s)
                    raise APIError(status, event.error)
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
                if self.settings.gateway.rebalance_on_join:
                    self._rebalance(info)
            else:  # a new process under a known id: what the old one served is gone with it
                self._lost(info.instance_id, "restarted", to="anywhere")
        elif info.serving is not None:
            self._reconcile(info)

    def _rebalance(self, joined: p.WorkerInfo) -> None:
        """A worker joined a phase with a queue (a scale-up under load): each of the others keeps its
        oldest waiting requests up to an even share and is asked to give back the newest beyond it (FCFS:
        those furthest from starting). A worker gives back only what it has not started; each request
        given back migrates to the least-loaded worker, normally the new one."""
        if joined.role == "decode":
            return  # decode work arrives with its KV; nothing queues for it here
        waiting: dict[str, list[InFlight]] = {}
        for flight in self.inflight.values():
            if flight.role == joined.role and flight.instance and flight.kv is None and not flight.first_token_at:
                waiting.setdefault(flight.instance, []).append(flight)
        workers = [i for i in self.registry.alive(joined.role) if not i.info.draining]
        share = math.ceil(sum(map(len, waiting.values())) / max(1, len(workers)))
        for instance, flights in waiting.items():
            for flight in sorted(flights, key=lambda f: f.arrived)[share:]:
                asyncio.ensure_future(self._publish(p.Subjects.withdraw(instance), p.WithdrawRequest(
                    request_id=flight.request_id, reason=f"{joined.instance_id} joined")))

    def _reconcile(self, info: p.WorkerInfo) -> None:
        """Requests placed on this worker that it does not have: their message was lost (a NATS server
        died with it). Two reports in a row, each built by the worker two heartbeat intervals after the
        request was sent (its own clock: a gateway behind on its messages must not conclude from old
        reports), before anything is concluded: a last token may also be handled after the report."""
        serving = set(info.serving or ())
        settled = info.sent_at - 2 * self.settings.worker.heartbeat_s
        for flight in list(self.inflight.values()):
            if flight.instance != info.instance_id:
                continue
            if flight.request_id in serving or flight.assigned_at > settled:
                flight.unlisted = 0
                continue
            flight.unlisted += 1
            if flight.unlisted >= 2:
                self._migrate(flight, f"worker {info.instance_id} does not have it (a control message was lost)",
                              to="same")

    async def _on_bye(self, msg: Msg) -> None:
        try:
            bye = p.decode(p.WorkerBye, msg.data)
        except ValueError:
            return
        if self.registry.remove(bye.instance_id) is not None:
            self._lost(bye.instance_id, "left")

    async def _on_scaling(self, msg: Msg) -> None:
        try:
            action = p.decode(p.ScalingAction, msg.data)
        except ValueError:
            return
        self.metrics.scaling.labels(action.role, action.kind).inc()

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(_PRUNE_INTERVAL_S)
            if not self.nc.is_connected:  # judge no worker by a silence that is our own link's
                if self._nats_down_since is None:
                    self._nats_down_since = time.monotonic()
                if self._nats_outage_over_bound():
                    for flight in list(self.inflight.values()):
                        self._fail(flight, 503, self._nats_outage_message())
                continue
            if self._nats_down_since is not None:  # back: every worker gets a full dead_after_s to report again
                self._nats_down_since = None
                self.registry.touch_all()
            for inst in self.registry.prune():
                self._lost(inst.instance_id, "stopped reporting")

    @property
    def control_plane_down(self) -> bool:
        """Whether this gateway's NATS connection is down (as of the last prune pass)."""
        return self._nats_down_since is not None

    def _nats_outage_over_bound(self) -> bool:
        since = self._nats_down_since
        return since is not None and time.monotonic() - since > self.settings.gateway.nats_outage_s

    def _nats_outage_message(self) -> str:
        return f"the control plane (NATS) has been unreachable for over {self.settings.gateway.nats_outage_s:g} s"

    def _lost(self, instance_id: str, what: str, to: Literal["elsewhere", "anywhere"] = "elsewhere") -> None:
        """A worker is gone (or restarted, `anywhere`: its new process may take the requests back)."""
        served = [f for f in self.inflight.values() if f.instance == instance_id]
        if served:
            log.warning("worker %s %s; migrating its %d requests", instance_id, what, len(served))
        else:
            log.info("worker %s %s", instance_id, what)
        for flight in served:
            self._migrate(flight, f"worker {instance_id} {what}", to=to)

    async def _on_tokens(self, msg: Msg) -> None:
        try:
            batch = p.decode(p.TokenBatch, msg.data)
        except ValueError:
            log.warning("malformed token batch dropped")
            return
        now = time.time()
        for event in batch.events:
            flight = self.inflight.get(event.request_id)
            if flight is None or flight.done or flight.instance != batch.instance_id:
                if event.kv is not None:  # its KV waits for a pull nobody will make: free it (a no-op where
                    # the request's own abort got there first)
                    await self._publish(p.Subjects.abort, p.AbortRequest(
                        request_id=event.request_id, reason="the request ended or moved on at its gateway",
                        instance_id=batch.instance_id))
                continue  # events of a worker the request migrated away from are not the stream's
            self._on_event(flight, event, now)

    def _on_event(self, flight: InFlight, event: p.TokenEvent, now: float) -> None:
        if event.error is not None:
            if event.migrate:
                self._migrate(flight, event.error)
            else:
                self._fail(flight, event.status, event.error)
            return
        expected = len(flight.output_token_ids) + 1
        if event.num_output_tokens != expected:
            if event.num_output_tokens > expected:  # lost in transit: continue from the tokens we have
                self._migrate(flight, f"tokens {expected}-{event.num_output_tokens - 1} were lost in transit")
            return  # (a repeat of one already streamed: dropped)
        flight.output_token_ids.append(event.token_id)
        flight.emitted_chars += len(event.text)
        if not flight.first_token_at:
            flight.first_token_at = now
            self.metrics.pending.set(self.pending)
            self.metrics.ttft.observe(now - flight.arrived)
            self.state.update(flight.request_id, first_token=now, status="prefilled")
        else:
            self.metrics.itl.observe(now - flight.last_token_at)
        flight.last_token_at = now
        if event.transfer is not None:
            transport = event.transfer.transport
            self.metrics.kv_transfer.labels(transport=transport).observe(event.transfer.seconds)
            self.metrics.kv_bytes.labels(transport=transport).inc(event.transfer.nbytes)
            self.state.update(flight.request_id, status="decoding")
        flight.output_tokens = event.num_output_tokens
        if event.kv is not None and not event.finished:
            flight.kv = event.kv
            self._hand_to_decode(flight, event.kv)
        flight.events.put_nowait(event)
        if event.finished:
            flight.finish_reason = event.finish_reason
            self._finish(flight, "ok")

    def _hand_to_decode(self, flight: InFlight, kv: p.KVHandle) -> None:
        worker = self.registry.pick("decode")
        if worker is None:  # wait for one as a migration does (the prefill worker keeps the KV meanwhile)
            flight.instance = ""
            asyncio.ensure_future(self._continue_elsewhere(flight, "decode", "waiting for a decode worker"))
            return
        self._assign(flight, worker.instance_id)
        message = p.DecodeRequest(request_id=flight.request_id, reply_to=self.inbox, kv=kv)
        publish = self._publish(p.Subjects.submit("decode", worker.instance_id), message, flight)
        # Its task starts on the next loop turn, after the handler that this first token wakes (the
        # caller queues the token next): the token is written to the client before this is encoded
        # and flushed (about 0.1 ms sooner here), and the decode worker gets it a moment later.
        asyncio.get_running_loop().call_soon(asyncio.ensure_future, publish)

    @staticmethod
    def _assign(flight: InFlight, instance_id: str) -> None:
        flight.instance, flight.assigned_at, flight.unlisted = instance_id, time.time(), 0

    # -- migration ----------------------------------------------------------------------------------

    def _migrate(self, flight: InFlight, reason: str, to: Literal["elsewhere", "anywhere", "same"] = "elsewhere"
                 ) -> None:
        """Continue a request on a worker of the phase it is in: another one than its own (gone, or
        silent), `anywhere` (its own restarted: the new process never had it), or the `same` (it
        does not list the request: the submit was lost, or is late, and then it drops the copy)."""
        if flight.done or not flight.instance:
            return  # ended, or already migrating
        old, limit = flight.instance, self.settings.gateway.migration_limit
        if flight.migrations >= limit:
            self._fail(flight, 503, f"{reason}; the request was not migrated again (migration limit {limit})")
            return
        flight.migrations += 1
        flight.instance = ""
        if to == "elsewhere":  # if the old worker is only slow, not dead, it must stop spending on it
            asyncio.ensure_future(self._publish(p.Subjects.abort, p.AbortRequest(
                request_id=flight.request_id, reason=f"migrated: {reason}", instance_id=old)))
        role: p.Role = "decode" if flight.kv is not None else flight.role
        avoid, only = (old, None) if to == "elsewhere" else (None, old) if to == "same" else (None, None)
        asyncio.ensure_future(self._continue_elsewhere(flight, role, reason, avoid, only))

    async def _continue_elsewhere(self, flight: InFlight, role: p.Role, reason: str, avoid: str | None = None,
                                  only: str | None = None) -> None:
        wait_s = self.settings.gateway.migration_wait_s
        deadline = time.monotonic() + wait_s
        queued = flight.prompt_tokens if role != "decode" else 0  # what dispatch counts until the next report

        def pick() -> Instance | None:
            return self.registry.instances.get(only) if only else self.registry.pick(role, queued, avoid=avoid)

        while (worker := pick()) is None:
            if time.monotonic() > deadline:
                self._fail(flight, 503, f"{reason}; no live {role} worker took the request within {wait_s:g} s")
                return
            await asyncio.sleep(_PRUNE_INTERVAL_S / 2)
            if flight.done:  # the client left, or the request timed out, meanwhile
                return
        self._assign(flight, worker.instance_id)
        message: p.Message = self._resumed(flight, role)
        if flight.migrations:
            self._record_migration(flight, role, worker.instance_id, reason)
        await self._publish(p.Subjects.submit(role, worker.instance_id), message, flight)

    def _resumed(self, flight: InFlight, role: p.Role) -> p.Message:
        """The message that continues a request on a new worker of `role` from where its stream is."""
        if role != "decode":  # nothing, or (colocated) the tokens streamed so far, to be computed again
            return flight.request.model_copy(update={"output_token_ids": list(flight.output_token_ids),
                                                     "num_emitted_chars": flight.emitted_chars})
        kv = flight.kv
        assert kv is not None
        if len(flight.output_token_ids) <= len(kv.meta.output_token_ids):  # nothing decoded: pull it again
            return p.DecodeRequest(request_id=flight.request_id, reply_to=self.inbox, kv=kv)
        # Decoded tokens have no KV anywhere now: the new decode worker computes it from the tokens.
        num_kv_tokens = flight.prompt_tokens + len(flight.output_token_ids) - 1
        num_blocks = math.ceil(num_kv_tokens / kv.meta.block_size)
        meta = kv.meta.model_copy(update={
            "output_token_ids": list(flight.output_token_ids), "output_text": None,
            "num_emitted_chars": flight.emitted_chars, "num_kv_tokens": num_kv_tokens, "num_blocks": num_blocks})
        return p.DecodeRequest(request_id=flight.request_id, reply_to=self.inbox, recompute=True,
                               kv=kv.model_copy(update={"meta": meta, "nbytes": meta.nbytes}))

    def _record_migration(self, flight: InFlight, role: p.Role, to: str, reason: str) -> None:
        log.info("request %s migrated to %s (%s; migration %d, %d tokens streamed)", flight.request_id, to, reason,
                 flight.migrations, len(flight.output_token_ids))
        self.metrics.migrations.labels(role=role).inc()
        now = time.time()
        self.state.update(flight.request_id, migrations=flight.migrations, migrated=now,
                          migration=f"{role} {to}: {reason}")
        flight.span.add_event("migration", {"role": role, "to": to, "reason": reason,
                                            "tokens_streamed": len(flight.output_token_ids)})

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

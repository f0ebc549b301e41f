"""The lifecycle every worker shares: build the engine, connect, register, serve, report, shut down.

A worker is an engine (on its own thread, services/worker/runner.py) plus NATS subscriptions.
Roles (services/prefill, services/decode, services/colocated) subclass `Worker` and fill in what they
subscribe to, what they do after a step, and how they describe their load; the KV hand-off between
prefill and decode is services/worker/kv_handoff.py. Load reports double as registration and
heartbeat: sent at start, soon after the load changes, and every `heartbeat_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import logging
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from operator import methodcaller
from typing import Any, ClassVar, TypeVar

import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry.context import Context

from services.worker.metrics import WorkerMetrics
from services.worker.runner import STOP_WAIT_S, EngineRunner, StepResult
from shared import protocol as p
from shared.config import RoleSettings, Settings
from shared.control_plane import connect_nats
from shared.cpus import lower_priority
from shared.engine import Engine, EngineConfig, StepOutput
from shared.protocol import M
from shared.state import RequestFields, StateWriter, connect_redis, push_steps, steps_key
from shared.tasks import cancel_all
from shared.telemetry import Tracing, extract_context
from shared.transfer import KVTransport, create_transport

log = logging.getLogger(__name__)

T = TypeVar("T")

_REPORT_MIN_INTERVAL_S = 0.05  # load reports on change, at most this often
_STEP_RECORDS_INTERVAL_S = 1.0
_STAGE_TIMEOUT_S = 1.0  # each stage of a shutdown (`Worker.shutdown`), but the engine's: 13 s at most in all
CLOSE_WAIT_S = 3.0  # the other ranks of a tensor-parallel engine to exit


@dataclass
class Tracked:
    """A request this worker currently serves."""

    request_id: str
    reply_to: str
    trace: Context | None
    received: float  # wall-clock time this worker got it
    first_token_at: float = 0.0  # when a step of this worker produced its first token (colocated)


class Worker(ABC):
    role: ClassVar[p.Role]

    def __init__(self, settings: Settings, instance_id: str) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.engine_settings: RoleSettings = settings.role(self.role)
        self.started_at = time.time()
        self.requests: dict[str, Any] = {}  # request id -> Tracked (or a role's subclass of it)
        self.exit_code = 0
        self.draining = False
        self._stop = asyncio.Event()
        self._seq = 0
        self._last_report = 0.0
        self._report_pending = False
        self._tasks: set[asyncio.Future[Any]] = set()
        self._steps: asyncio.Queue[StepResult[Any]] = asyncio.Queue()
        self.tracing = Tracing(settings.telemetry, f"distserve-{self.role}")
        self.nc: NATS | None = None
        self.redis: aioredis.Redis | None = None
        self.state = StateWriter(None, settings.request_ttl_s)
        self.transport: KVTransport | None = None
        self.engine: Engine | None = None
        self.runner: EngineRunner[Any] | None = None
        self.metrics = WorkerMetrics(instance_id, self.role, lambda: self.runner.stats if self.runner else None)

    # -- what roles provide ---------------------------------------------------------------------------

    async def start(self) -> list[Coroutine[Any, Any, None]]:
        """Once everything else is up: the role's own parts (its side of the KV hand-off, its other
        subscriptions). The loops it returns run until shutdown."""
        return []

    async def on_submit(self, msg: Msg) -> None:
        """New work for this worker: a PrefillRequest (prefill and colocated roles) by default."""
        self.accept(msg)

    def post_step(self, outputs: list[StepOutput]) -> Any:
        """Runs on the engine thread right after a step (e.g. export KV while it is still held)."""
        return None

    @abstractmethod
    async def handle_step(self, result: StepResult[Any]) -> None:
        """Runs on the event loop for every step that produced outputs, in step order."""

    def load(self) -> p.WorkerLoad:
        """What dispatch needs to know (the engine's queues, by default)."""
        assert self.runner is not None
        s = self.runner.stats
        return p.WorkerLoad(queued_tokens=s.queued_prompt_tokens, waiting=s.num_waiting, running=s.num_running,
                            held=s.num_held, free_blocks=s.free_blocks, total_blocks=s.total_blocks)

    @property
    def hands_off_kv(self) -> bool:
        return self.role in ("prefill", "decode")

    def kv_transport(self) -> KVTransport:
        assert self.transport is not None, "the transport starts before the role"
        return self.transport

    def duplicate(self, request_id: str) -> bool:
        """A submit for a request this worker has: a copy its gateway sent again because this worker's
        reports did not list it yet (the first was late, not lost). The first one is kept."""
        if not self.serves(request_id):
            return False
        log.info("%s: a second submit of %s dropped: it is here already", self.instance_id, request_id)
        return True

    def serving(self) -> list[str]:
        """The requests this worker has, for the periodic heartbeat (`WorkerInfo.serving`)."""
        return list(self.requests)

    def serves(self, request_id: str) -> bool:
        """Whether this worker holds anything of the request (an abort is for it)."""
        return request_id in self.requests

    async def on_abort(self, request_id: str) -> None:
        """Forget a request everywhere it may be (the gateway aborted it)."""
        if self.requests.pop(request_id, None) is not None:
            await self.engine_call(methodcaller("abort", request_id))
            self.report_soon()

    # -- lifecycle ------------------------------------------------------------------------------------

    def build_engine(self) -> Engine:
        config = EngineConfig.of(self.engine_settings, self.settings.model, self.role)
        if self.hands_off_kv:  # a tensor-parallel engine's other ranks move their heads on transports of their own
            config = config.model_copy(update={"kv_transport": self.settings.worker.transport,
                                               "kv_transfer_host": self.settings.worker.transfer_host})
        if self.settings.engine == "emulated":  # no torch in this process
            from services.worker.emulation import emulated_engine

            return emulated_engine(config, self.settings)
        from shared.engine.engine import LLMEngine

        return LLMEngine(config)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        """Serve until `stop()` (or a fatal error); returns the process exit code. A stop while it is still
        starting (NATS not reachable yet, the model loading) ends the start: SIGTERM always works."""
        starting = asyncio.ensure_future(self._start_serving())
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # a failed start raises here
                await stopped
            else:
                log.warning("%s: stopped before it was ready", self.instance_id)
                await cancel_all([starting])
        finally:
            stopped.cancel()
            # A bounded shutdown, interpreter exit included: past the deadline every thread's stack goes
            # to stderr (what hung) and the process exits with 1, so a stuck stage never keeps a worker.
            faulthandler.dump_traceback_later(self.settings.worker.shutdown_timeout_s, exit=True)
            await self.shutdown()
        return self.exit_code

    async def _start_serving(self) -> None:
        loop = asyncio.get_running_loop()
        lower_priority(self.engine_settings.nice)  # before the engine's threads: they inherit it
        self.engine = await asyncio.to_thread(self.build_engine)
        self.nc = await connect_nats(self.settings.nats_address, self.instance_id)
        if self.settings.redis_url:
            self.redis = connect_redis(self.settings.redis_url)
            self.state = StateWriter(self.redis, self.settings.request_ttl_s)
            self.state.start()
        if self.hands_off_kv:
            self.transport = create_transport(self.settings.worker.transport, self.settings.worker.transfer_host)
            await self.transport.start()
        self.runner = EngineRunner(self.engine, loop, self._steps.put_nowait, self.post_step, self._fatal,
                                   min_interval=self.engine_settings.step_interval_s)
        self.runner.start()
        for role_loop in await self.start():
            self.spawn(role_loop)
        await self.nc.subscribe(p.Subjects.submit(self.role, self.instance_id), cb=self.on_submit)
        await self.nc.subscribe(p.Subjects.abort, cb=self._on_abort_msg)
        await self.nc.subscribe(p.Subjects.withdraw(self.instance_id), cb=self._on_withdraw)
        await self.nc.subscribe(p.Subjects.drain(self.instance_id), cb=self._on_drain)
        self.spawn(self._step_loop())
        self.spawn(self._heartbeat_loop())
        if self.settings.worker.metrics_port:
            self.metrics.serve(self.settings.worker.metrics_host, self.settings.worker.metrics_port)
        self.spawn(self._step_records_loop())
        await self.report()
        log.info("%s ready: model %s, engine %s (TP%d x PP%d), dtype %s, weights %s, %d KV blocks, max_model_len %d",
                 self.instance_id, self.engine.model_name, self.engine.label, self.engine.config.tp,
                 self.engine.config.pp, self.engine.config.dtype, self.engine.config.weights,
                 self.runner.stats.total_blocks, self.engine.max_model_len)

    async def shutdown(self) -> None:
        """Each stage within its own bound, named in the log when it overruns: a stuck close (a transport's,
        a task that will not end) costs seconds and says which, never the whole shutdown."""
        await self._stage("handing requests back", self._hand_back())
        await self._stage("saying goodbye", self._bye())
        await self._stage("stopping tasks", cancel_all(list(self._tasks)))
        if self.runner is not None:  # the engine thread ends with its step under way
            await self._stage("stopping the engine", self.runner.stop(), STOP_WAIT_S)
        if self.engine is not None:  # a tensor-parallel engine's other ranks
            await self._stage("closing the engine", asyncio.to_thread(self.engine.close), CLOSE_WAIT_S)
        if self.transport is not None:
            await self._stage("closing the KV transport", self.transport.close())
        await self._stage("flushing request state", self.state.close())
        if self.redis is not None:
            await self._stage("closing Redis", self.redis.aclose())
        if self.nc is not None:
            await self._stage("closing NATS", self.nc.close())
        self.tracing.shutdown()

    async def _stage(self, name: str, step: Coroutine[Any, Any, Any], timeout: float = _STAGE_TIMEOUT_S) -> None:
        try:
            await asyncio.wait_for(step, timeout)
        except TimeoutError:
            log.warning("%s: shutdown: %s did not finish within %.0f s; going on", self.instance_id, name, timeout)
        except Exception as exc:  # a failed close is no reason to stay
            log.warning("%s: shutdown: %s failed: %s", self.instance_id, name, exc)

    async def _hand_back(self) -> None:
        for request_id, tracked in list(self.requests.items()):  # each gateway continues them elsewhere
            await self.send_error(tracked.reply_to, request_id, f"worker {self.instance_id} shut down", 503,
                                  migrate=True)
        self.requests.clear()

    async def _bye(self) -> None:
        if self.nc is not None and self.nc.is_connected:
            await self.nc.publish(p.Subjects.bye, p.WorkerBye(instance_id=self.instance_id).encode())
            await self.nc.flush(timeout=1)

    def _fatal(self, exc: BaseException) -> None:
        log.error("%s: engine failed (%s); stopping", self.instance_id, exc)
        self.exit_code = 1
        self.stop()

    def spawn(self, coro: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: task failed", self.instance_id, exc_info=task.exception())

    async def _step_loop(self) -> None:
        while True:
            result = await self._steps.get()
            try:
                await self.handle_step(result)
            except Exception:
                log.exception("%s: handling step outputs failed", self.instance_id)
            self.report_soon()

    # -- helpers for roles --------------------------------------------------------------------------

    def accept(self, msg: Msg) -> None:
        """A PrefillRequest for this worker (prefill and colocated roles): queue it in the engine."""
        req = self.parse(p.PrefillRequest, msg)
        if req is None or self.duplicate(req.request_id):
            return
        now = time.time()
        fields: RequestFields = {"queued": now, "prefill_instance": self.instance_id}
        if self.role == "colocated":
            fields["decode_instance"] = self.instance_id
        self.state.update(req.request_id, **fields)
        self.admit(req, Tracked(req.request_id, req.reply_to, extract_context(msg.headers), now))

    def admit(self, req: p.PrefillRequest, tracked: Tracked) -> None:
        self.requests[req.request_id] = tracked
        future = self.engine_call(lambda e: e.add_request(req.request_id, req.prompt_token_ids, req.sampling,
                                                          req.output_token_ids, req.num_emitted_chars))
        future.add_done_callback(lambda f: self._admitted(req, f.exception()))

    def _admitted(self, req: p.PrefillRequest, error: BaseException | None) -> None:
        if error is None:
            self.report_soon()
            return
        self.requests.pop(req.request_id, None)
        status = 400 if isinstance(error, ValueError) else 500
        self.spawn(self.send_error(req.reply_to, req.request_id, str(error), status))

    def engine_call(self, fn: Callable[[Engine], T]) -> asyncio.Future[T]:
        assert self.runner is not None
        return self.runner.call(fn)

    async def publish(self, subject: str, message: p.Message, headers: dict[str, str] | None = None) -> None:
        assert self.nc is not None
        await self.nc.publish(subject, message.encode(), headers=headers)

    async def send_events(self, events: list[tuple[str, p.TokenEvent]]) -> None:
        """One TokenBatch per gateway for everything one step produced."""
        by_inbox: dict[str, list[p.TokenEvent]] = {}
        for reply_to, event in events:
            by_inbox.setdefault(reply_to, []).append(event)
        for reply_to, batch in by_inbox.items():
            try:
                await self.publish(reply_to, p.TokenBatch(instance_id=self.instance_id, events=batch))
            except Exception as exc:  # one gateway's failure is not the other gateways' (NATS closed: all fail)
                log.warning("%s: tokens for %s not sent: %s", self.instance_id, reply_to, exc)
        # The NATS client writes from its flusher task: let it run now, before the caller's bookkeeping
        # (a first token reached the gateway about 0.1 ms sooner in an instrumented run).
        await asyncio.sleep(0)

    async def send_error(self, reply_to: str, request_id: str, message: str, status: int,
                         migrate: bool = False) -> None:
        event = p.TokenEvent(request_id=request_id, finished=True, error=message, status=status, migrate=migrate)
        with contextlib.suppress(Exception):
            await self.send_events([(reply_to, event)])
        self.state.update(request_id, error=message)

    def record_prefill(self, out: StepOutput, tracked: Tracked, result: StepResult[Any], **attributes: Any) -> None:
        """The request's prefill phases, from its arrival here to the end of the step that computed it."""
        self.state.update(out.request_id, prefill_start=result.started, prefill_end=result.ended)
        self.metrics.observe_queue_time(result.started - tracked.received)
        self.tracing.record("prefill queue", tracked.received, result.started, tracked.trace)
        self.tracing.record("prefill compute", result.started, result.ended, tracked.trace,
                            {"instance": self.instance_id, "prompt_tokens": out.num_prompt_tokens, **attributes})

    @staticmethod
    def event(output: StepOutput, **extra: Any) -> p.TokenEvent:
        return p.TokenEvent(request_id=output.request_id, token_id=output.token_id, text=output.text,
                            finished=output.finished, finish_reason=output.finish_reason,
                            num_prompt_tokens=output.num_prompt_tokens,
                            num_output_tokens=output.num_output_tokens, **extra)

    # -- load reports ---------------------------------------------------------------------------------

    def info(self, serving: bool = False) -> p.WorkerInfo:
        assert self.engine is not None
        self._seq += 1
        return p.WorkerInfo(
            instance_id=self.instance_id, role=self.role, model=self.engine.model_name,
            max_model_len=self.engine.max_model_len, pid=os.getpid(), host=socket.gethostname(),
            started_at=self.started_at, seq=self._seq,
            transport=self.transport.name if self.transport else None,
            transfer_address=self.transport.address if self.transport else None, load=self.load(),
            engine=self.engine.label, tp=self.engine.config.tp, pp=self.engine.config.pp,
            serving=self.serving() if serving else None, sent_at=time.time(), draining=self.draining,
        )

    async def report(self, serving: bool = False) -> None:
        self._last_report = time.monotonic()
        self._report_pending = False
        if self.nc is not None and self.nc.is_connected:
            await self.publish(p.Subjects.heartbeat, self.info(serving))

    def report_soon(self) -> None:
        """A load report now, or as soon as the rate limit allows."""
        if self._report_pending:
            return
        self._report_pending = True
        delay = max(0.0, self._last_report + _REPORT_MIN_INTERVAL_S - time.monotonic())
        asyncio.get_running_loop().call_later(delay, lambda: self.spawn(self.report()))

    async def _step_records_loop(self) -> None:
        """Every second, the engine's new step records to the metrics and to Redis (for `distserve profile
        --refit`)."""
        key = steps_key(self.role, self.instance_id)
        while True:
            await asyncio.sleep(_STEP_RECORDS_INTERVAL_S)
            records = await self.engine_call(lambda e: e.take_step_records())
            self.metrics.observe_steps(records)
            if not records or self.redis is None:
                continue
            try:
                await push_steps(self.redis, key, [json.dumps(asdict(r)) for r in records],
                                 self.settings.request_ttl_s)
            except Exception as exc:  # state is best effort: never the worker's failure
                log.warning("%s: step records not written: %s", self.instance_id, exc)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.worker.heartbeat_s)
            try:
                await self.report(serving=True)
            except Exception as exc:
                log.warning("%s: heartbeat failed: %s", self.instance_id, exc)

    async def _on_drain(self, msg: Msg) -> None:
        if self.draining or self.parse(p.WorkerDrain, msg) is None:
            return
        log.info("%s draining: no new work; it stops once its %d requests are done", self.instance_id,
                 len(self.serving()))
        self.draining = True
        self.spawn(self._drain())

    async def _drain(self) -> None:
        """Stop once idle for two heartbeats after `draining` was reported: by then no gateway sends work here.
        A submit already on its way is served, and restarts the wait."""
        await self.report()
        quiet_since = None
        while True:
            await asyncio.sleep(self.settings.worker.heartbeat_s)
            if self.serving():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= 2 * self.settings.worker.heartbeat_s:
                log.info("%s drained; stopping", self.instance_id)
                self.stop()
                return

    def parse(self, kind: type[M], msg: Msg) -> M | None:
        """A message of ours, or None (logged) for one that does not parse: never a crashed handler."""
        try:
            return p.decode(kind, msg.data)
        except ValueError:
            log.warning("%s: malformed %s on %s dropped", self.instance_id, kind.__name__, msg.subject)
            return None

    async def _on_withdraw(self, msg: Msg) -> None:
        req = self.parse(p.WithdrawRequest, msg)
        if req is None or self.role == "decode" or req.request_id not in self.requests:
            return
        self.spawn(self._withdraw(req))  # never wait for the engine in a callback

    async def _withdraw(self, req: p.WithdrawRequest) -> None:
        if not await self.engine_call(lambda e: e.withdraw(req.request_id)):
            return  # its prefill has begun: it stays
        tracked = self.requests.pop(req.request_id, None)
        if tracked is not None:
            await self.send_error(tracked.reply_to, req.request_id, f"withdrawn from {self.instance_id}: "
                                  f"{req.reason}", 503, migrate=True)
            self.report_soon()

    async def _on_abort_msg(self, msg: Msg) -> None:
        abort = self.parse(p.AbortRequest, msg)
        if abort is None or abort.instance_id not in (None, self.instance_id):
            return
        if self.serves(abort.request_id):
            self.spawn(self.on_abort(abort.request_id))  # never wait for the engine in a callback

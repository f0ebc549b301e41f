"""The online planner: watch the serving traffic on NATS, replan when it shifts, publish the plan.

Monitoring only reads messages the system already sends (no protocol change):
  - ``PrefillRequest`` on ``prefill.*.submit`` / ``colocated.*.submit``: arrival time and prompt length;
  - ``TokenBatch`` on ``gateway.*.tokens``: a request's first event is its first token (TTFT), its
    finished event gives the output length and, with the first, its TPOT;
  - ``WorkerInfo`` heartbeats: how many workers of each role run now.
Policy (policy.py) decides; actuation here is advisory: the plan is published as a `PlanMessage` on
``Subjects.plan`` and exported as Prometheus gauges (starting and stopping workers is left to an operator).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import sys
import time
from collections import deque
from typing import Any

from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from pydantic import ValidationError

from services.planner.args import add_problem_args, cluster_from, resolve_profiles
from services.planner.policy import Observed, Policy, WindowStats, plan_for, should_replan, window_stats
from services.planner.report import plan_message
from services.planner.simulator import Limits, Parallel
from shared.config import add_config_flag, add_flags, settings_from_args
from shared.control_plane import connect_nats
from shared.protocol import PlanMessage, PrefillRequest, Subjects, TokenBatch, WorkerInfo, decode
from shared.workloads import SLO

log = logging.getLogger(__name__)


class Tracker:
    """Requests seen in the last ``keep`` seconds, built from the traffic (wall-clock times)."""

    def __init__(self, keep: float) -> None:
        self.keep = keep
        self.pending: dict[str, dict[str, float]] = {}  # request_id -> arrived, input, first
        self.done: deque[Observed] = deque()
        self.workers: dict[str, str] = {}  # instance -> role
        # Token events of requests not (yet) seen arriving: each NATS subscription runs its own task,
        # so a request's tokens can be handled before its submit message; or it arrived before we
        # subscribed (then they age out). request_id -> first, and finished, output when it finished.
        self.early: dict[str, dict[str, float]] = {}

    def arrived(self, request_id: str, arrived_at: float, input_tokens: int, max_tokens: int = 0) -> None:
        self.pending.setdefault(request_id, {"arrived": arrived_at, "input": float(input_tokens),
                                             "max_tokens": float(max_tokens)})
        early = self.early.pop(request_id, None)
        if early is not None:
            self.event(request_id, False, 0, early["first"])
            if "finished" in early:
                self.event(request_id, True, int(early["output"]), early["finished"])

    def event(self, request_id: str, finished: bool, output_tokens: int, at: float) -> None:
        entry = self.pending.get(request_id)
        if entry is None:
            early = self.early.setdefault(request_id, {"first": at})
            if finished:
                early |= {"finished": at, "output": float(output_tokens)}
            return
        entry.setdefault("first", at)
        if finished:
            del self.pending[request_id]
            first, n = entry["first"], max(output_tokens, 1)
            tpot = (at - first) / (n - 1) if n > 1 else float("nan")
            self.done.append(Observed(entry["arrived"], int(entry["input"]), n, first - entry["arrived"], tpot,
                                      int(entry["max_tokens"])))

    def requests(self, now: float) -> list[Observed]:
        while self.done and self.done[0].arrived_at < now - self.keep:
            self.done.popleft()
        stale = [k for k, v in self.pending.items() if v["arrived"] < now - self.keep]
        for k in stale:
            del self.pending[k]
        for k in [k for k, v in self.early.items() if v["first"] < now - self.keep]:
            del self.early[k]
        unfinished = [Observed(v["arrived"], int(v["input"]), ttft=v.get("first", math.nan) - v["arrived"],
                               max_tokens=int(v["max_tokens"])) for v in self.pending.values()]
        return list(self.done) + unfinished


async def subscriptions_registered(nc: Any, timeout: float = 10.0) -> None:
    """Returns once the server has processed every subscription sent on ``nc`` so far.

    Not ``nc.flush()``: nats-py (2.16) writes its PING straight to the socket, ahead of SUBs still
    queued for its flusher task, so the PONG can come back before the server has seen them (the
    test of this service then lost its traffic in 8 of about 100 runs). A message to
    ourselves is queued behind the SUBs: when it comes back, the server has registered them.
    """
    sub = await nc.subscribe(nc.new_inbox(), max_msgs=1)
    await nc.publish(sub.subject, b"")
    await sub.next_msg(timeout=timeout)


class Gauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        def g(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"distserve_planner_{name}", doc, labels, registry=registry)

        self.instances = g("instances", "recommended instances per phase", ("phase",))
        self.tp = g("tensor_parallel", "recommended tensor-parallel degree per phase", ("phase",))
        self.pp = g("pipeline_parallel", "recommended pipeline-parallel degree per phase", ("phase",))
        self.gpus = g("gpus", "GPUs the recommended plan uses")
        self.rate = g("observed_rate", "arrivals/s over the window")
        self.demand = g("demand", "requests/s planned for: arrivals plus the backlog over one window")
        self.backlog = g("backlog", "requests of the window still without a first token past the TTFT objective")
        self.attainment = g("observed_attainment", "SLO attainment of finished requests over the window")
        self.workers = g("workers", "workers reporting heartbeats, by role", ("role",))
        self.replans = g("replans", "plans made since start")

    def observe(self, stats: WindowStats, workers: dict[str, str]) -> None:
        self.rate.set(stats.rate)
        self.demand.set(stats.demand)
        self.backlog.set(stats.backlog)
        self.attainment.set(stats.attainment)
        for role in ("prefill", "decode", "colocated"):
            self.workers.labels(role).set(sum(1 for r in workers.values() if r == role))

    def plan(self, plan: PlanMessage) -> None:
        for phase, shape in (("prefill", plan.prefill), ("decode", plan.decode)):
            self.instances.labels(phase).set(shape.instances)
            self.tp.labels(phase).set(shape.tp)
            self.pp.labels(phase).set(shape.pp)
        self.gpus.set(plan.gpus)
        self.replans.inc()


class PlannerService:
    def __init__(self, policy: Policy, nats_url: str, window: float, interval: float,
                 registry: CollectorRegistry | None = None) -> None:
        if window <= 0 or interval <= 0:
            raise ValueError("window and interval must be positive")
        self.policy, self.nats_url, self.window, self.interval = policy, nats_url, window, interval
        self.tracker = Tracker(keep=window)
        self.gauges = Gauges(registry or CollectorRegistry())
        self.last: WindowStats | None = None
        self.plans: list[PlanMessage] = []
        self.ready = asyncio.Event()  # set once the server has registered every subscription

    async def _on_submit(self, msg: Msg) -> None:
        try:
            req = decode(PrefillRequest, msg.data)
        except ValidationError:
            return
        self.tracker.arrived(req.request_id, req.arrived_at, len(req.prompt_token_ids), req.sampling.max_tokens)

    async def _on_tokens(self, msg: Msg) -> None:
        now = time.time()
        try:
            batch = decode(TokenBatch, msg.data)
        except ValidationError:
            return
        for e in batch.events:
            self.tracker.event(e.request_id, e.finished, e.num_output_tokens, now)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            info = decode(WorkerInfo, msg.data)
        except ValidationError:
            return
        self.tracker.workers[info.instance_id] = info.role

    async def tick(self, nc: Any, now: float | None = None) -> PlanMessage | None:
        """One policy evaluation; publishes and returns the new plan if one was made."""
        now = time.time() if now is None else now
        stats = window_stats(self.tracker.requests(now), now, self.window, self.policy.slo)
        self.gauges.observe(stats, self.tracker.workers)
        reason = should_replan(self.last, stats, self.policy)
        if reason is None:
            return None
        try:
            last = self.plans[-1] if self.plans else None  # its shapes are kept where nearly as good
            running = None if last is None else (Parallel(last.prefill.tp, last.prefill.pp),
                                                 Parallel(last.decode.tp, last.decode.pp))
            plan = await asyncio.to_thread(plan_for, stats, self.policy, running)
        except ValueError as e:  # PlanError included: keep serving the old plan, say why
            log.warning("replan (%s) failed: %s", reason, e)
            return None
        out = plan_message(plan, reason=reason, observed_rate=stats.rate, at=now)
        self.last = stats
        self.plans.append(out)
        self.gauges.plan(out)
        await nc.publish(Subjects.plan, out.encode())
        log.info("new plan (%s): prefill TP%d x%d, decode TP%d x%d", reason, out.prefill.tp,
                 out.prefill.instances, out.decode.tp, out.decode.instances)
        return out

    async def run(self, stop: asyncio.Event) -> None:
        nc = await connect_nats(self.nats_url, "planner")
        try:
            for role in ("prefill", "colocated"):
                await nc.subscribe(Subjects.all_submits(role), cb=self._on_submit)
            await nc.subscribe(Subjects.all_tokens, cb=self._on_tokens)
            await nc.subscribe(Subjects.heartbeat, cb=self._on_heartbeat)
            await subscriptions_registered(nc)
            self.ready.set()
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.interval)
                except TimeoutError:
                    await self.tick(nc)
        finally:
            await nc.drain()


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("planner", help="online planner: watch traffic on NATS, publish recommended plans")
    add_problem_args(p)
    add_config_flag(p)  # the stack's settings: NATS from --nats-url, DISTSERVE_NATS_URL or the file
    add_flags(p, {"--nats-url": "nats_url"})
    p.add_argument("--window", type=float, default=60.0, help="seconds of traffic to plan from")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between policy evaluations")
    p.add_argument("--threshold", type=float, default=0.2, help="relative shift that triggers a replan")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0: none)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address the Prometheus port listens on")
    p.set_defaults(func=_run_service)


def _run_service(args: argparse.Namespace) -> int:
    try:
        model, baseline = resolve_profiles(args)
        policy = Policy(model, cluster_from(args), SLO(args.ttft, args.tpot, args.attainment), baseline,
                        rel_change=args.threshold, num_requests=min(args.num_requests, 1000),
                        limits=Limits(prefill_token_budget=args.prefill_budget), seed=args.seed)
        registry = CollectorRegistry()
        service = PlannerService(policy, settings_from_args(args).nats_address, args.window, args.interval,
                                 registry)
    except (ValueError, FileNotFoundError) as e:
        print(f"distserve planner: error: {e}", file=sys.stderr)
        return 2
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_host, registry=registry)
    logging.basicConfig(level=logging.INFO)
    stop = asyncio.Event()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way to stop it
        asyncio.run(service.run(stop))
    return 0

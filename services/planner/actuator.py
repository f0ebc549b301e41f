"""The actuator: makes the running stack what the online planner plans, without flapping.

The online planner (service.py) publishes a `PlanMessage` whenever the traffic has moved. The actuator,
run by `distserve up --autoscale`, takes the latest one and changes the prefill and decode workers to
match it: it starts the missing instances of the planned shape (TP x PP), and drains the surplus (a
draining worker takes no new request, finishes its own, then leaves: nothing migrates).

Against flapping: no action within `cooldown_s` of the last one, and a scale-down only once the lower
count has been planned for `scale_down_after_s` without a break (a scale-up is immediate: an SLO is at
stake). Every decision is logged, recorded in Redis (`distserve:scaling`, newest first) and published on
NATS (`Subjects.scaling`), where the gateway counts it (`distserve_scaling_actions_total`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

import redis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared import protocol as p
from shared.control_plane import connect_nats

log = logging.getLogger("distserve.actuator")

SCALING_KEY = "distserve:scaling"  # Redis list of decisions, newest first
_KEPT = 1000


@dataclass(frozen=True)
class Running:
    """A worker the stack runs (and does not retire)."""

    name: str
    role: str
    tp: int
    pp: int


@dataclass(frozen=True)
class Action:
    kind: Literal["start", "drain"]
    role: str
    tp: int
    pp: int
    reason: str
    instance: str | None = None  # the worker drained; a started one's id once it is started


class Actuator:
    """The decisions, from the latest plan and the running workers (no I/O: `Autoscaler` acts on them)."""

    def __init__(self, cooldown_s: float = 30.0, scale_down_after_s: float = 60.0) -> None:
        self.cooldown_s = cooldown_s
        self.scale_down_after_s = scale_down_after_s
        self.plan: p.PlanMessage | None = None
        self.last_action_at = -float("inf")
        self._lower_since: dict[str, float] = {}  # role -> since when fewer instances are planned than run

    def decide(self, running: Sequence[Running], now: float) -> list[Action]:
        plan = self.plan
        if plan is None or now - self.last_action_at < self.cooldown_s:
            return []
        actions: list[Action] = []
        for role, shape in (("prefill", plan.prefill), ("decode", plan.decode)):
            mine = [w for w in running if w.role == role]
            fit = [w for w in mine if (w.tp, w.pp) == (shape.tp, shape.pp)]
            planned = f"plan ({plan.reason}): {shape.instances} x TP{shape.tp}xPP{shape.pp}"
            if len(fit) < shape.instances:
                self._lower_since.pop(role, None)
                actions += [Action("start", role, shape.tp, shape.pp, f"{planned}, {len(fit)} running")
                            for _ in range(shape.instances - len(fit))]
                continue
            # The surplus: workers of another shape, and the newest of the planned shape beyond its count
            surplus = [w for w in mine if w not in fit] + sorted(fit, key=_started_order)[shape.instances:]
            if not surplus:
                self._lower_since.pop(role, None)
                continue
            since = self._lower_since.setdefault(role, now)
            if now - since >= self.scale_down_after_s:
                self._lower_since.pop(role)
                actions += [Action("drain", role, w.tp, w.pp, f"{planned}, {len(mine)} running", w.name)
                            for w in surplus]
        if actions:
            self.last_action_at = now
        return actions


def _started_order(worker: Running) -> int:
    """Instance ids end in their start index: the newest leave first."""
    return int(worker.name.rsplit("-", 1)[1])


class ScalableStack(Protocol):
    """What the actuator needs of a stack (services/launcher.py's `Stack`)."""

    def running(self) -> list[Running]: ...

    def add_worker(self, role: str, tp: int = 1, pp: int = 1) -> str: ...

    def retire(self, name: str, now: float) -> None: ...


class Autoscaler:
    """The actuator wired to a stack: plans in from NATS, decisions out to the stack, NATS and Redis.

    NATS runs on a thread of its own (the launcher's supervision loop is synchronous); `tick` is called
    from that loop."""

    def __init__(self, actuator: Actuator, nats_url: str, redis_url: str | None) -> None:
        self.actuator = actuator
        self.nats_url = nats_url
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=2) if redis_url else None
        self._plans: queue.Queue[p.PlanMessage] = queue.Queue()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autoscaler-nats", daemon=True)
        self._nc: NATS | None = None
        self.decisions: list[Action] = []

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the autoscaler could not reach NATS within {timeout:.0f} s")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._connect())
        self._loop.run_forever()

    async def _connect(self) -> None:
        nc = await connect_nats(self.nats_url, "autoscaler")
        await nc.subscribe(p.Subjects.plan, cb=self._on_plan)
        await nc.flush()
        self._nc = nc
        self._ready.set()

    async def _on_plan(self, msg: Msg) -> None:
        try:
            self._plans.put(p.decode(p.PlanMessage, msg.data))
        except ValueError:
            log.warning("a malformed plan was dropped")

    def _publish(self, subject: str, message: p.Message) -> None:
        assert self._nc is not None, "started"
        asyncio.run_coroutine_threadsafe(self._nc.publish(subject, message.encode()), self._loop).result(timeout=5)

    def tick(self, stack: ScalableStack, now: float | None = None) -> list[Action]:
        """Take the newest plan, decide, act; the actions taken."""
        now = time.monotonic() if now is None else now
        while not self._plans.empty():
            self.actuator.plan = self._plans.get_nowait()
        taken = []
        for action in self.actuator.decide(stack.running(), now):
            if action.kind == "start":
                action = Action("start", action.role, action.tp, action.pp, action.reason,
                                stack.add_worker(action.role, action.tp, action.pp))
            else:
                assert action.instance is not None
                self._publish(p.Subjects.drain(action.instance), p.WorkerDrain(instance_id=action.instance))
                stack.retire(action.instance, now)
            log.info("scaling: %s %s %s (TP%d x PP%d): %s", action.kind, action.role, action.instance, action.tp,
                     action.pp, action.reason)
            self._record(action)
            taken.append(action)
        self.decisions += taken
        return taken

    def _record(self, action: Action) -> None:
        self._publish(p.Subjects.scaling, p.ScalingAction(**asdict(action), at=time.time()))
        if self.redis is None:
            return
        try:
            entry = json.dumps({**asdict(action), "at": time.time()})
            self.redis.lpush(SCALING_KEY, entry)
            self.redis.ltrim(SCALING_KEY, 0, _KEPT - 1)
        except redis.RedisError as exc:  # a record, not the decision: scaling goes on
            log.warning("scaling decision not recorded in Redis: %s", exc)

    def close(self) -> None:
        if self._nc is not None:
            asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if self.redis is not None:
            self.redis.close()

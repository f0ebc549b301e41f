"""Which workers are alive and how loaded they are, from the reports they publish.

Dispatch picks the least-loaded instance of a role by the one policy the simulator uses too
(shared/dispatch_policy.py). Reports arrive every few hundred ms and on load changes; between
reports the gateway counts what it dispatched itself, so a burst does not all land on the
instance that looked idle in the last report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from shared import protocol as p
from shared.dispatch_policy import Load, least_loaded


@dataclass
class Instance:
    info: p.WorkerInfo
    last_seen: float  # monotonic
    dispatched_tokens: int = 0  # prompt tokens sent since its last report
    dispatched_requests: int = 0  # requests sent since its last report

    @property
    def instance_id(self) -> str:
        return self.info.instance_id

    @property
    def role(self) -> p.Role:
        return self.info.role

    @property
    def load(self) -> p.WorkerLoad:
        return self.info.load

    def dispatch_load(self) -> Load:
        """The reported load plus what this gateway sent it since the report."""
        load = self.info.load
        return Load(queued_tokens=load.queued_tokens + self.dispatched_tokens,
                    waiting=load.waiting + self.dispatched_requests, running=load.running,
                    free_blocks=load.free_blocks)


class Registry:
    def __init__(self, dead_after_s: float) -> None:
        self.dead_after_s = dead_after_s
        self.instances: dict[str, Instance] = {}

    def update(self, info: p.WorkerInfo, now: float | None = None) -> bool:
        """Apply a report; True if the instance is new (or restarted)."""
        now = time.monotonic() if now is None else now
        known = self.instances.get(info.instance_id)
        if known is not None and known.info.started_at == info.started_at:
            if info.seq <= known.info.seq:
                return False  # out of order
            known.info, known.last_seen = info, now
            known.dispatched_tokens = known.dispatched_requests = 0
            return False
        self.instances[info.instance_id] = Instance(info, now)
        return True

    def touch_all(self, now: float | None = None) -> None:
        """Count every instance as just heard from (after an outage of our own: their silence was ours)."""
        now = time.monotonic() if now is None else now
        for inst in self.instances.values():
            inst.last_seen = now

    def remove(self, instance_id: str) -> Instance | None:
        return self.instances.pop(instance_id, None)

    def prune(self, now: float | None = None) -> list[Instance]:
        """Drop and return the instances whose reports stopped."""
        now = time.monotonic() if now is None else now
        dead = [i for i in self.instances.values() if now - i.last_seen > self.dead_after_s]
        for inst in dead:
            del self.instances[inst.instance_id]
        return dead

    def alive(self, role: p.Role) -> list[Instance]:
        return [i for i in self.instances.values() if i.role == role]

    def ready(self) -> bool:
        """Serving needs a prefill and a decode worker, or a colocated one."""
        return bool(self.alive("prefill") and self.alive("decode")) or bool(self.alive("colocated"))

    def entry_role(self) -> p.Role | None:
        """Where new requests go: colocated workers if that is what runs, else prefill workers."""
        if self.alive("prefill") and self.alive("decode"):
            return "prefill"
        if self.alive("colocated"):
            return "colocated"
        return None

    def max_model_len(self) -> int | None:
        lens = [i.info.max_model_len for i in self.instances.values()]
        return min(lens) if lens else None

    def model_names(self) -> list[str]:
        return sorted({i.info.model for i in self.instances.values()})

    def pick(self, role: p.Role, prompt_tokens: int = 0, avoid: str | None = None) -> Instance | None:
        """The instance a request goes to now (never `avoid`); counts the dispatch until the next report."""
        candidates = [i for i in self.alive(role) if i.instance_id != avoid and not i.info.draining]
        best = least_loaded(role, candidates, Instance.dispatch_load)
        if best is None:
            return None
        best.dispatched_tokens += prompt_tokens
        best.dispatched_requests += 1
        return best

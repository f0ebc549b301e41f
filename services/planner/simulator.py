"""Discrete-event simulation of a deployment serving a trace: per-request TTFT and TPOT.

Instances (what each models):
  - prefill: FCFS batches under a token budget, ``pp`` pipeline stages of T/pp each (a new batch
    enters stage 1 as soon as it is free); a prompt's KV stays held until its decode instance has
    pulled it, and held KV counts against the instance's memory.
  - decode: pulls KV when it has room (FIFO per instance over its link: transfer = bytes/bandwidth),
    continuous batching with rounds as in ``batch.py``, a KV memory limit that grows one token per
    request per round, and preemption of the newest request when memory runs out (its KV is swapped
    out and pulled back later).
  - colocated (vLLM-style): one queue; a prefill batch runs whenever waiting requests fit in memory
    (prefill first), otherwise a decode round; preempted requests are recomputed by a new prefill.
Requests go to the least-loaded instance by the gateway's own policy (shared/dispatch_policy.py),
each instance reporting its load as a worker does. TTFT ends with the first token (end
of prefill); TPOT = (finish - first token) / (output tokens - 1), so it includes the KV transfer and
decode queueing.

Phase modes for placement searches: ``prefill`` runs prefill instances alone (TTFT only),
``decode`` feeds requests straight into decode instances (TPOT only).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from services.planner.batch import DecodeBatch
from services.planner.latency import LatencyModel, StepProfile
from services.planner.workload import Trace
from shared.config import Role
from shared.dispatch_policy import Load, least_loaded
from shared.workloads import SLO

Mode = Literal["both", "prefill", "decode"]


@dataclass(frozen=True)
class Parallel:
    tp: int
    pp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"parallel degrees must be >= 1, got tp={self.tp} pp={self.pp}")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"TP{self.tp}xPP{self.pp}"


@dataclass(frozen=True)
class Limits:
    """Scheduler limits shared by every instance."""

    prefill_token_budget: int = 2048  # DistServe's L_m; a longer prompt runs alone
    max_batch: int = 256  # decode batch cap (vLLM's max_num_seqs)

    def __post_init__(self) -> None:
        if self.prefill_token_budget < 1 or self.max_batch < 1:
            raise ValueError("scheduler limits must be >= 1")


@dataclass(frozen=True)
class Disaggregated:
    prefill: Parallel
    num_prefill: int
    decode: Parallel
    num_decode: int
    kv_bandwidth: float = math.inf  # bytes/s into each decode instance

    def __post_init__(self) -> None:
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError("a disaggregated deployment needs >= 1 prefill and >= 1 decode instance")
        if self.kv_bandwidth <= 0:
            raise ValueError("kv_bandwidth must be positive")

    @property
    def gpus(self) -> int:
        return self.num_prefill * self.prefill.gpus + self.num_decode * self.decode.gpus


@dataclass(frozen=True)
class Colocated:
    config: Parallel
    num_instances: int = 1

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError("a colocated deployment needs >= 1 instance")

    @property
    def gpus(self) -> int:
        return self.num_instances * self.config.gpus


Deployment = Disaggregated | Colocated


@dataclass
class SimResult:
    ttft: np.ndarray  # seconds; nan where the run stopped before the first token
    tpot: np.ndarray  # seconds; nan where the run stopped before the request finished
    completed: bool  # False when stopped early (the attainment target was already lost)
    peak_kv_tokens: list[int] = field(default_factory=list)  # per memory-limited instance
    kv_capacity: list[int] = field(default_factory=list)
    preemptions: int = 0
    mode: Mode = "both"

    def _met(self, slo: SLO) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            ttft_ok = np.ones(len(self.ttft), bool) if self.mode == "decode" else self.ttft <= slo.ttft_s
            tpot_ok = np.ones(len(self.tpot), bool) if self.mode == "prefill" else self.tpot <= slo.tpot_s
        return ttft_ok & tpot_ok

    def attainment(self, slo: SLO) -> float:
        """Fraction of requests meeting both SLOs (a phase mode judges its own phase only)."""
        return float(self._met(slo).mean())

    def ttft_attainment(self, slo: SLO) -> float:
        with np.errstate(invalid="ignore"):
            return float((self.ttft <= slo.ttft_s).mean())

    def tpot_attainment(self, slo: SLO) -> float:
        with np.errstate(invalid="ignore"):
            return float((self.tpot <= slo.tpot_s).mean())


class _Sim:
    """Event loop plus the per-request record every instance writes into."""

    def __init__(self, trace: Trace, slo: SLO | None, mode: Mode, stop_after: int | None,
                 kv_bytes_per_token: int) -> None:
        self.heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.seq = 0
        self.now = 0.0
        self.arrival = trace.arrivals.tolist()
        self.inp = trace.inputs.tolist()
        self.out = trace.outputs.tolist()
        n = len(self.arrival)
        self.first = [math.nan] * n
        self.finish = [math.nan] * n
        self.slo, self.mode, self.stop_after = slo, mode, stop_after
        self.kv_bytes = kv_bytes_per_token
        self.violations = 0
        self.stopped = False
        self.preemptions = 0

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, args))

    def run(self) -> None:
        heap = self.heap
        while heap and not self.stopped:
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            fn(*args)

    def _violate(self) -> None:
        self.violations += 1
        if self.stop_after is not None and self.violations > self.stop_after:
            self.stopped = True

    def first_token(self, i: int) -> None:
        self.first[i] = self.now
        if self.slo and self.mode != "decode" and self.now - self.arrival[i] > self.slo.ttft_s:
            self._violate()

    def finished(self, i: int) -> None:
        self.finish[i] = self.now
        if not self.slo or self.mode == "prefill" or self.out[i] <= 1:
            return
        late_first = self.mode != "decode" and self.first[i] - self.arrival[i] > self.slo.ttft_s
        if not late_first and (self.now - self.first[i]) / (self.out[i] - 1) > self.slo.tpot_s:
            self._violate()


class PrefillInstance:
    def __init__(self, sim: _Sim, step: StepProfile, pp: int, capacity: int, budget: int,
                 on_done: Callable[[int, PrefillInstance], None]) -> None:
        self.sim, self.step, self.pp, self.capacity, self.budget = sim, step, pp, capacity, budget
        self.on_done = on_done
        self.queue: deque[int] = deque()
        self.queued_tokens = 0
        self.inflight_tokens = 0
        self.inflight_requests = 0
        self.held_tokens = 0  # KV of finished prompts not yet pulled by a decode instance
        self.stage_free = [0.0] * pp
        self.busy = False  # stage 1 is running a batch
        self.peak = 0

    def dispatch_load(self) -> Load:
        # As a prefill engine counts them: a prompt stays queued until its prefill ends.
        return Load(queued_tokens=self.queued_tokens + self.inflight_tokens,
                    waiting=len(self.queue) + self.inflight_requests)

    def submit(self, i: int) -> None:
        self.queue.append(i)
        self.queued_tokens += self.sim.inp[i]
        if not self.busy:
            self._launch()

    def release(self, tokens: int) -> None:
        self.held_tokens -= tokens
        if not self.busy:
            self._launch()

    def _launch(self) -> None:
        inp, queue = self.sim.inp, self.queue
        room = self.capacity - self.held_tokens - self.inflight_tokens
        batch: list[int] = []
        tokens = sq = 0
        while queue:
            length = inp[queue[0]]
            if (batch and tokens + length > self.budget) or tokens + length > room:
                break
            batch.append(queue.popleft())
            tokens += length
            sq += length * length
        if not batch:
            return  # empty, or waiting for held KV to be pulled
        self.queued_tokens -= tokens
        self.inflight_tokens += tokens
        self.inflight_requests += len(batch)
        self.peak = max(self.peak, self.held_tokens + self.inflight_tokens)
        stage = self.step.prefill_time(tokens, sq) / self.pp
        t = self.sim.now
        for k in range(self.pp):  # exact pipeline: a batch may wait for the one ahead at any stage
            t = max(t, self.stage_free[k]) + stage
            self.stage_free[k] = t
        self.busy = True
        self.sim.at(self.stage_free[0], self._stage1_free)
        self.sim.at(t, self._done, batch, tokens)

    def _stage1_free(self) -> None:
        self.busy = False
        self._launch()

    def _done(self, batch: list[int], tokens: int) -> None:
        self.inflight_tokens -= tokens
        self.inflight_requests -= len(batch)
        self.held_tokens += tokens
        for i in batch:
            self.on_done(i, self)


class _Stepping:
    """Shared by decode and colocated instances: a DecodeBatch driven by boundary events."""

    def __init__(self, sim: _Sim, step: StepProfile, pp: int, capacity: int, max_batch: int) -> None:
        self.sim, self.step, self.capacity, self.max_batch = sim, step, capacity, max_batch
        self.batch = DecodeBatch(step, pp)
        self.used = 0  # KV tokens held: the batch's contexts plus reservations
        self.peak = 0
        self.t_boundary = 0.0  # time of the last applied round boundary
        self.target = 0  # round index of the scheduled boundary event
        self.epoch = 0  # invalidates a scheduled boundary event
        self.stepping = False  # a decode macro-step is scheduled
        self.busy = False  # any step (decode or prefill) in progress

    def _reserve(self, tokens: int) -> None:
        self.used += tokens
        self.peak = max(self.peak, self.used)

    def _start_decode(self) -> bool:
        """Schedule rounds up to the next finish or memory limit; False if the batch is empty."""
        b = self.batch
        while b.n and self.used + b.n > self.capacity:  # no room for the next round's tokens
            request, ctx, remaining = b.preempt_newest()
            self.used -= ctx
            self.sim.preemptions += 1
            self._preempted(request, ctx, remaining)
        if not b.n:
            return False
        m = (self.capacity - self.used) // b.n
        nxt = b.rounds_to_next_finish()
        if nxt is not None:
            m = min(m, max(nxt, 1))
        self.t_boundary = self.sim.now
        self.target = b.rounds + m
        self.epoch += 1
        self.stepping = self.busy = True
        self.sim.at(self.sim.now + b.duration(m), self._boundary, self.epoch)
        return True

    def _interrupt(self) -> None:
        """Make the round in progress the last of the macro-step, so new work joins at its end."""
        if not self.stepping:
            return
        b = self.batch
        done = b.rounds_within(self.sim.now - self.t_boundary)
        stop = b.rounds + done + 1
        if stop < self.target:
            self.target = stop
            self.epoch += 1
            self.sim.at(self.t_boundary + b.duration(done + 1), self._boundary, self.epoch)

    def _boundary(self, epoch: int) -> None:
        if epoch != self.epoch:
            return
        b = self.batch
        m = self.target - b.rounds
        self.used += m * b.n
        self.peak = max(self.peak, self.used)
        b.advance(m)
        for request in b.pop_finished():
            self.used -= self.sim.inp[request] + self.sim.out[request]
            self.sim.finished(request)
        self.stepping = self.busy = False
        self._next()

    def _next(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _preempted(self, request: int, ctx: int, remaining: int) -> None:  # pragma: no cover
        raise NotImplementedError


class DecodeInstance(_Stepping):
    def __init__(self, sim: _Sim, step: StepProfile, pp: int, capacity: int, max_batch: int,
                 bandwidth: float) -> None:
        super().__init__(sim, step, pp, capacity, max_batch)
        self.bandwidth = bandwidth
        self.waiting: deque[tuple[int, int, int, PrefillInstance | None]] = deque()  # (request, ctx, remaining, source)
        self.ready: list[tuple[int, int, int]] = []
        self.in_transit = 0
        self.link_free = 0.0

    def dispatch_load(self) -> Load:
        # As a decode worker reports it: pulled requests run, queued and pulling ones wait.
        return Load(waiting=len(self.waiting) + self.in_transit, running=self.batch.n + len(self.ready),
                    free_blocks=self.capacity - self.used)

    def enqueue(self, i: int, source: PrefillInstance | None) -> None:
        """A request whose first token is out: it waits here until its KV fits."""
        self.waiting.append((i, self.sim.inp[i] + 1, self.sim.out[i] - 1, source))
        self._wake()

    def _wake(self) -> None:
        if not self.busy:
            self._next()
        else:
            self._interrupt()

    def _preempted(self, request: int, ctx: int, remaining: int) -> None:
        self.waiting.appendleft((request, ctx, remaining, None))  # swapped out; pulled back later

    def _next(self) -> None:
        b, sim = self.batch, self.sim
        while self.waiting:  # pull KV while memory and batch slots allow
            i, ctx, remaining, source = self.waiting[0]
            slots = b.n + self.in_transit + len(self.ready)
            if slots >= self.max_batch or self.used + ctx + slots + 1 > self.capacity:
                break
            self.waiting.popleft()
            self._reserve(ctx)
            if self.bandwidth == math.inf:
                if source:
                    source.release(sim.inp[i])
                self.ready.append((i, ctx, remaining))
                continue
            start = max(sim.now, self.link_free)
            self.link_free = start + ctx * sim.kv_bytes / self.bandwidth
            self.in_transit += 1
            sim.at(self.link_free, self._arrived, i, ctx, remaining, source)
        for i, ctx, remaining in self.ready:
            b.add(i, ctx, remaining)
        self.ready.clear()
        self._start_decode()

    def _arrived(self, i: int, ctx: int, remaining: int, source: PrefillInstance | None) -> None:
        self.in_transit -= 1
        if source:
            source.release(self.sim.inp[i])
        self.ready.append((i, ctx, remaining))
        self._wake()


class ColocatedInstance(_Stepping):
    def __init__(self, sim: _Sim, step: StepProfile, capacity: int, max_batch: int, budget: int) -> None:
        super().__init__(sim, step, 1, capacity, max_batch)
        self.budget = budget
        self.waiting: deque[tuple[int, int, int]] = deque()  # (request, tokens to prefill, remaining)
        self.waiting_tokens = 0
        self.prefilling = 0  # requests in the prefill step in progress
        self.prefilling_tokens = 0

    def dispatch_load(self) -> Load:
        return Load(queued_tokens=self.waiting_tokens + self.prefilling_tokens,
                    waiting=len(self.waiting) + self.prefilling, running=self.batch.n,
                    free_blocks=self.capacity - self.used)

    def submit(self, i: int) -> None:
        self.waiting.append((i, self.sim.inp[i], self.sim.out[i]))
        self.waiting_tokens += self.sim.inp[i]
        if not self.busy:
            self._next()
        else:
            self._interrupt()

    def _preempted(self, request: int, ctx: int, remaining: int) -> None:
        # recompute: prefill the prompt and every token generated so far again (ctx counts them all)
        self.waiting.appendleft((request, ctx, remaining))
        self.waiting_tokens += ctx

    def _next(self) -> None:
        b = self.batch
        batch: list[tuple[int, int, int]] = []
        tokens = sq = 0
        while self.waiting:  # prefill first, as vLLM schedules
            i, length, remaining = self.waiting[0]
            slots = b.n + len(batch)
            if (batch and tokens + length > self.budget) or slots >= self.max_batch \
                    or self.used + tokens + length + 1 + slots + 1 > self.capacity:
                break
            batch.append(self.waiting.popleft())
            tokens += length
            sq += length * length
        if batch:
            self._reserve(tokens + len(batch))
            self.busy = True
            self.waiting_tokens -= tokens
            self.prefilling, self.prefilling_tokens = len(batch), tokens
            self.sim.at(self.sim.now + self.step.prefill_time(tokens, sq), self._prefilled, batch)
        elif not self._start_decode():
            self.busy = False

    def _prefilled(self, batch: list[tuple[int, int, int]]) -> None:
        sim = self.sim
        for i, length, remaining in batch:
            if math.isnan(sim.first[i]):
                sim.first_token(i)
            if remaining <= 1:  # the prefill produced its last token
                self.used -= length + 1
                sim.finished(i)
            else:
                self.batch.add(i, length + 1, remaining - 1)
        self.busy = False
        self.prefilling = self.prefilling_tokens = 0
        self._next()


def simulate(deployment: Deployment, model: LatencyModel, trace: Trace, *, limits: Limits = Limits(),
             slo: SLO | None = None, mode: Mode = "both", stop_after_violations: int | None = None) -> SimResult:
    """Replay ``trace`` on ``deployment`` with step times from ``model``.

    With ``slo`` and ``stop_after_violations`` the run stops as soon as more requests than that
    have missed the SLO (the attainment target is lost: the goodput search needs no more).
    ValueError if a request cannot fit an instance's KV memory.
    """
    if len(trace) == 0:
        raise ValueError("empty trace")
    if mode != "both" and not isinstance(deployment, Disaggregated):
        raise ValueError("phase modes simulate a disaggregated deployment")
    sim = _Sim(trace, slo, mode, stop_after_violations, model.kv_bytes_per_token)
    longest = int((trace.inputs + trace.outputs).max())
    result_pools: list[PrefillInstance | _Stepping] = []

    def need(config: Parallel, tokens: int) -> int:
        if not model.allows(config.tp, config.pp):
            raise ValueError(f"profile {model.model}/{model.hardware} does not cover {config}")
        capacity = model.kv_capacity(config.tp, config.pp)
        if capacity < tokens:
            raise ValueError(f"{model.model} {config}: KV memory holds {capacity} tokens, a request needs {tokens}")
        return capacity

    def pick(role: Role, pool: list[Any]) -> Any:
        return least_loaded(role, pool, lambda instance: instance.dispatch_load())

    submit: Callable[[int], None]
    if isinstance(deployment, Colocated):
        cap = need(deployment.config, longest + 1)
        step = model.step(deployment.config.tp)
        colo = [ColocatedInstance(sim, step, cap, limits.max_batch, limits.prefill_token_budget)
                for _ in range(deployment.num_instances)]
        result_pools.extend(colo)

        def submit(i: int) -> None:
            pick("colocated", colo).submit(i)
    else:
        d = deployment
        decodes: list[DecodeInstance] = []
        if mode != "prefill":
            cap = need(d.decode, longest + 1)
            step = model.step(d.decode.tp)
            bandwidth = d.kv_bandwidth if mode == "both" else math.inf
            decodes = [DecodeInstance(sim, step, d.decode.pp, cap, limits.max_batch, bandwidth)
                       for _ in range(d.num_decode)]
            result_pools.extend(decodes)
        if mode == "decode":
            def submit(i: int) -> None:
                sim.first[i] = sim.now  # arrives with its first token
                if sim.out[i] <= 1:
                    sim.finished(i)
                else:
                    pick("decode", decodes).enqueue(i, None)
        else:
            def prefilled(i: int, source: PrefillInstance) -> None:
                sim.first_token(i)
                if mode == "prefill" or sim.out[i] <= 1:
                    source.release(sim.inp[i])
                    sim.finished(i)
                else:
                    pick("decode", decodes).enqueue(i, source)

            cap = need(d.prefill, int(trace.inputs.max()))
            step = model.step(d.prefill.tp)
            prefills = [PrefillInstance(sim, step, d.prefill.pp, cap, limits.prefill_token_budget, prefilled)
                        for _ in range(d.num_prefill)]
            result_pools[:0] = prefills

            def submit(i: int) -> None:
                pick("prefill", prefills).submit(i)

    n = len(sim.arrival)

    def arrive(i: int) -> None:
        if i + 1 < n:
            sim.at(sim.arrival[i + 1], arrive, i + 1)
        submit(i)

    sim.at(sim.arrival[0], arrive, 0)
    sim.run()
    first, finish = np.array(sim.first), np.array(sim.finish)
    arrival, out = trace.arrivals, trace.outputs
    tpot = np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), np.where(np.isnan(finish), np.nan, 0.0))
    return SimResult(
        ttft=first - arrival, tpot=tpot, completed=not sim.stopped,
        peak_kv_tokens=[p.peak for p in result_pools], kv_capacity=[p.capacity for p in result_pools],
        preemptions=sim.preemptions, mode=mode,
    )

"""The online planner's policy: pure functions from observed requests to "replan?" and to a plan.

Monitoring (service.py) turns NATS traffic into ``Observed`` records; this module summarizes a
window of them, decides whether the workload moved enough to plan again, and plans for it. The
same functions replay a recorded trace offline (``replay``), which is how the policy is tested.

Three choices keep it honest under overload, when the plan matters most:
- it plans from the requests that *arrived* in the window, not only those that finished (under
  overload only short ones finish): an unfinished request counts with its ``max_tokens``;
- it plans for the demand, not the arrival rate: requests still waiting for a first token past the
  TTFT objective (the backlog) are added as if they arrived again over the next window;
- it keeps the running instances' shape (TP x PP) while that shape's goodput per GPU is within
  ``keep_shape_margin`` of the best shape's, so a replan changes instance counts, not shapes
  (alternating shapes made the actuator start both).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from services.planner.latency import LatencyModel
from services.planner.placement import Plan, Problem, Shapes, plan_placement
from services.planner.simulator import Limits, Parallel
from services.planner.specs import Cluster
from services.planner.workload import Lengths, make_trace
from shared.workloads import SLO


@dataclass(frozen=True)
class Observed:
    """One request as the planner saw it (times in seconds, one clock)."""

    arrived_at: float
    input_tokens: int
    output_tokens: int = 0  # 0 until it finished
    ttft: float = math.nan  # nan until its first token
    tpot: float = math.nan  # nan for a single-token output or an unfinished request
    max_tokens: int = 0  # what it asked for (0: not known): an unfinished request's output estimate


@dataclass(frozen=True)
class WindowStats:
    end: float
    window: float
    arrivals: int
    rate: float  # arrivals/s over the window
    mean_input: float
    mean_output: float  # over the planning sample (finished outputs; max_tokens of unfinished ones)
    attainment: float  # share of finished requests meeting both SLOs; nan when none finished
    inputs: tuple[int, ...]  # the planning sample: arrivals whose output is known or estimable
    outputs: tuple[int, ...]
    finished: int = 0
    backlog: int = 0  # arrivals still without a first token past the TTFT objective

    @property
    def demand(self) -> float:
        """Requests/s to plan for: the arrivals, plus the backlog served again over one window."""
        return self.rate + self.backlog / self.window


@dataclass(frozen=True)
class Policy:
    model: LatencyModel
    cluster: Cluster
    slo: SLO
    baseline: LatencyModel | None = None
    rel_change: float = 0.2  # replan when demand or mean lengths move by more than this fraction
    min_finished: int = 20  # no plan from a sample of fewer requests than this
    keep_shape_margin: float = 0.25  # keep the running shape while its goodput/GPU is this close to the best
    num_requests: int = 500  # simulated requests per goodput search
    limits: Limits = Limits()
    seed: int = 0


def window_stats(requests: Iterable[Observed], now: float, window: float, slo: SLO) -> WindowStats:
    """Summary of the requests that arrived in (now - window, now]."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    recent = [r for r in requests if now - window < r.arrived_at <= now]
    done = [r for r in recent if r.output_tokens > 0]
    sample = [(r.input_tokens, r.output_tokens or r.max_tokens) for r in recent if r.output_tokens or r.max_tokens]
    met = [r.ttft <= slo.ttft_s and (math.isnan(r.tpot) or r.tpot <= slo.tpot_s) for r in done]
    late = [r for r in recent if math.isnan(r.ttft) and r.output_tokens == 0 and now - r.arrived_at > slo.ttft_s]
    return WindowStats(
        end=now, window=window, arrivals=len(recent), rate=len(recent) / window,
        mean_input=float(np.mean([r.input_tokens for r in recent])) if recent else 0.0,
        mean_output=float(np.mean([o for _, o in sample])) if sample else 0.0,
        attainment=float(np.mean(met)) if done else math.nan,
        inputs=tuple(i for i, _ in sample), outputs=tuple(o for _, o in sample),
        finished=len(done), backlog=len(late),
    )


def _moved(old: float, new: float, rel: float) -> bool:
    return abs(new - old) > rel * max(abs(old), 1e-9)


def should_replan(last: WindowStats | None, now: WindowStats, policy: Policy) -> str | None:
    """Why a new plan is due (None: keep the current one)."""
    if len(now.inputs) < policy.min_finished:
        return None
    if last is None:
        return "first plan"
    for name, old, new in (("demand", last.demand, now.demand), ("mean input", last.mean_input, now.mean_input),
                           ("mean output", last.mean_output, now.mean_output)):
        if _moved(old, new, policy.rel_change):
            return f"{name} moved {old:.3g} -> {new:.3g}"
    if now.attainment < policy.slo.attainment_target:
        return f"SLO attainment {now.attainment:.1%} below the {policy.slo.attainment_target:.0%} target"
    return None


def plan_for(stats: WindowStats, policy: Policy, running: tuple[Parallel, Parallel] | None = None) -> Plan:
    """A placement for the observed demand and lengths, keeping the ``running`` (prefill, decode) shapes
    where they are nearly as good (ValueError/PlanError if it cannot be planned)."""
    if not stats.inputs or stats.demand <= 0:
        raise ValueError("no requests with known lengths in the window: nothing to plan for")
    lengths = Lengths("observed", np.array(stats.inputs), np.array(stats.outputs))
    trace = make_trace(lengths, policy.num_requests, seed=policy.seed)
    keep = None if running is None else Shapes(*running, policy.keep_shape_margin)
    problem = Problem(policy.model, policy.cluster, policy.slo, stats.demand, trace, policy.limits, keep=keep)
    return plan_placement(problem, "auto", policy.baseline)


def replay(requests: Sequence[Observed], policy: Policy, window: float, every: float
           ) -> list[tuple[float, str, Plan]]:
    """Offline: evaluate the policy every ``every`` seconds over a recorded trace; the plans it makes."""
    if every <= 0:
        raise ValueError(f"replay interval must be positive, got {every}")
    ordered = sorted(requests, key=lambda r: r.arrived_at)
    if not ordered:
        return []
    decisions: list[tuple[float, str, Plan]] = []
    last: WindowStats | None = None
    t = ordered[0].arrived_at + window
    while t <= ordered[-1].arrived_at + every:
        stats = window_stats(ordered, t, window, policy.slo)
        reason = should_replan(last, stats, policy)
        if reason:
            running = (decisions[-1][2].prefill.config, decisions[-1][2].decode.config) if decisions else None
            decisions.append((t, reason, plan_for(stats, policy, running)))
            last = stats
        t += every
    return decisions


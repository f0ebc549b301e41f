"""The online planner's policy: pure functions from observed requests to "replan?" and to a plan.

Monitoring (service.py) turns NATS traffic into ``Observed`` records; this module summarizes a
window of them, decides whether the workload moved enough to plan again, and plans for it. The
same functions replay a recorded trace offline (``replay``), which is how the policy is tested.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from services.planner.latency import LatencyModel
from services.planner.placement import Plan, Problem, plan_placement
from services.planner.simulator import Limits
from services.planner.specs import Cluster
from services.planner.workload import Lengths, make_trace
from shared.workloads import SLO


@dataclass(frozen=True)
class Observed:
    """One request as the planner saw it (times in seconds, one clock)."""

    arrived_at: float
    input_tokens: int
    output_tokens: int = 0  # 0 until it finished
    ttft: float = math.nan
    tpot: float = math.nan  # nan for a single-token output or an unfinished request


@dataclass(frozen=True)
class WindowStats:
    end: float
    window: float
    arrivals: int
    rate: float  # arrivals/s over the window
    mean_input: float
    mean_output: float  # over finished requests
    attainment: float  # share of finished requests meeting both SLOs; nan when none finished
    inputs: tuple[int, ...]  # lengths of finished requests: the workload to plan for
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class Policy:
    model: LatencyModel
    cluster: Cluster
    slo: SLO
    baseline: LatencyModel | None = None
    rel_change: float = 0.2  # replan when rate or mean lengths move by more than this fraction
    min_finished: int = 20  # no plan from fewer finished requests than this
    num_requests: int = 500  # simulated requests per goodput search
    limits: Limits = Limits()
    seed: int = 0


def window_stats(requests: Iterable[Observed], now: float, window: float, slo: SLO) -> WindowStats:
    """Summary of the requests that arrived in (now - window, now]."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    recent = [r for r in requests if now - window < r.arrived_at <= now]
    done = [r for r in recent if r.output_tokens > 0]
    met = [r.ttft <= slo.ttft_s and (math.isnan(r.tpot) or r.tpot <= slo.tpot_s) for r in done]
    return WindowStats(
        end=now, window=window, arrivals=len(recent), rate=len(recent) / window,
        mean_input=float(np.mean([r.input_tokens for r in recent])) if recent else 0.0,
        mean_output=float(np.mean([r.output_tokens for r in done])) if done else 0.0,
        attainment=float(np.mean(met)) if done else math.nan,
        inputs=tuple(r.input_tokens for r in done), outputs=tuple(r.output_tokens for r in done),
    )


def _moved(old: float, new: float, rel: float) -> bool:
    return abs(new - old) > rel * max(abs(old), 1e-9)


def should_replan(last: WindowStats | None, now: WindowStats, policy: Policy) -> str | None:
    """Why a new plan is due (None: keep the current one)."""
    if len(now.inputs) < policy.min_finished:
        return None
    if last is None:
        return "first plan"
    for name, old, new in (("arrival rate", last.rate, now.rate), ("mean input", last.mean_input, now.mean_input),
                           ("mean output", last.mean_output, now.mean_output)):
        if _moved(old, new, policy.rel_change):
            return f"{name} moved {old:.3g} -> {new:.3g}"
    if now.attainment < policy.slo.attainment_target:
        return f"SLO attainment {now.attainment:.1%} below the {policy.slo.attainment_target:.0%} target"
    return None


def plan_for(stats: WindowStats, policy: Policy) -> Plan:
    """A placement for the observed rate and lengths (ValueError/PlanError if it cannot be planned)."""
    if not stats.inputs or stats.rate <= 0:
        raise ValueError("no finished requests in the window: nothing to plan for")
    lengths = Lengths("observed", np.array(stats.inputs), np.array(stats.outputs))
    trace = make_trace(lengths, policy.num_requests, seed=policy.seed)
    problem = Problem(policy.model, policy.cluster, policy.slo, stats.rate, trace, policy.limits)
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
            decisions.append((t, reason, plan_for(stats, policy)))
            last = stats
        t += every
    return decisions


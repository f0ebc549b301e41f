"""Goodput: the highest request rate at which a deployment still meets the SLO attainment target.

Found by bracketing and bisection over the rate, replaying the same unit-rate trace scaled to each
rate. Each simulation stops as soon as the target is lost (more misses than it allows), so rates
far above the goodput cost little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.planner.latency import LatencyModel
from services.planner.simulator import Deployment, Limits, Mode, SimResult, simulate
from services.planner.workload import Trace
from shared.workloads import SLO

MIN_RATE, MAX_RATE = 1e-3, 1e5


@dataclass(frozen=True)
class Goodput:
    rate: float  # requests/s; 0 when even MIN_RATE misses the target
    attainment: float  # at that rate
    simulations: int


def attainment_at(deployment: Deployment, model: LatencyModel, trace: Trace, rate: float, slo: SLO, *,
                  limits: Limits | None = None, mode: Mode = "both", early_stop: bool = False) -> SimResult:
    stop = math.floor((1 - slo.attainment_target) * len(trace) + 1e-9) if early_stop else None
    return simulate(deployment, model, trace.at_rate(rate), limits=limits or Limits(), slo=slo, mode=mode,
                    stop_after_violations=stop)


def find_goodput(deployment: Deployment, model: LatencyModel, trace: Trace, slo: SLO, *,
                 limits: Limits | None = None, mode: Mode = "both", hint: float = 1.0,
                 rel_tol: float = 0.02) -> Goodput:
    """Largest rate (within ``rel_tol``) whose SLO attainment is >= ``slo.attainment_target``."""
    sims = 0
    best = (0.0, 0.0)

    def ok(rate: float) -> bool:
        nonlocal sims, best
        sims += 1
        result = attainment_at(deployment, model, trace, rate, slo, limits=limits, mode=mode, early_stop=True)
        att = result.attainment(slo)
        if att >= slo.attainment_target and rate > best[0]:
            best = (rate, att)
        return att >= slo.attainment_target

    rate = min(max(hint, MIN_RATE), MAX_RATE)
    if ok(rate):
        lo, hi = rate, rate * 2
        while hi < MAX_RATE and ok(hi):
            lo, hi = hi, hi * 2
        if hi >= MAX_RATE:
            return Goodput(best[0], best[1], sims)
    else:
        lo, hi = rate / 2, rate
        while lo > MIN_RATE and not ok(lo):
            lo, hi = lo / 2, lo
        if lo <= MIN_RATE:
            return Goodput(0.0, 0.0, sims)
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return Goodput(best[0], best[1], sims)

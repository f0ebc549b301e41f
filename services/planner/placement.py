"""Placement search: DistServe's Algorithms 1 and 2 over a latency model, scored by simulated goodput.

Algorithm 1 (high node-affinity: KV may cross nodes cheaply) picks the prefill configuration and the
decode configuration independently, each the (tp, pp) with the highest per-GPU goodput in a
phase-only simulation, then replicates each to reach the target rate.

Algorithm 2 (low node-affinity: KV must stay on NVLink) keeps the prefill and decode segments of
one pipeline stage in the same node: it enumerates intra-node segments (tp, stages per node) for
both phases that fit a node's GPUs together, times an inter-node pipeline depth, and replicates the
resulting unit (one prefill plus one decode instance) to reach the target rate.

Only configurations the profile covers (``LatencyModel.allows``), whose TP group fits in a node and
whose KV memory holds the longest request of the trace are considered. Everything here is a pure
function of a ``Problem``; phase goodputs are memoized per search in a dict the caller owns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

from services.planner.goodput import attainment_at, find_goodput
from services.planner.latency import LatencyModel
from services.planner.simulator import Colocated, Disaggregated, Limits, Parallel
from services.planner.specs import Cluster
from services.planner.workload import Trace
from shared.workloads import SLO

Phase = Literal["prefill", "decode"]
Algorithm = Literal[1, 2]


class PlanError(ValueError):
    """No configuration can serve the workload under the SLO (or none fits in memory)."""


@dataclass(frozen=True)
class Shapes:
    """The instance shapes already running, which a replan keeps while they are within ``margin`` of the
    best shape's deployed goodput per GPU (the online planner: counts move, shapes do not flap)."""

    prefill: Parallel
    decode: Parallel
    margin: float = 0.25


@dataclass(frozen=True)
class Problem:
    model: LatencyModel  # the disaggregated engine's profile
    cluster: Cluster
    slo: SLO
    rate: float  # target requests/s
    trace: Trace  # unit-rate trace: the workload's lengths and arrival pattern
    limits: Limits = Limits()
    keep: Shapes | None = None

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"target rate must be positive, got {self.rate}")

    def need_tokens(self, phase: Phase) -> int:
        """KV tokens an instance must hold for the longest request of the trace."""
        if phase == "prefill":
            return int(self.trace.inputs.max())
        return int((self.trace.inputs + self.trace.outputs).max()) + 1


@dataclass(frozen=True)
class Scored:
    """One instance configuration's phase-only goodput."""

    config: Parallel
    goodput: float  # requests/s of one instance
    simulations: int

    @property
    def per_gpu(self) -> float:
        return self.goodput / self.config.gpus


Cache = dict[tuple[Phase, int, int], Scored]


def fits(model: LatencyModel, config: Parallel, tokens: int) -> bool:
    return model.allows(config.tp, config.pp) and model.kv_capacity(config.tp, config.pp) >= tokens


def instance_configs(problem: Problem, phase: Phase) -> list[Parallel]:
    """Algorithm 1's space: TP inside a node, any pipeline depth the cluster holds, memory permitting."""
    c, model = problem.cluster, problem.model
    need = problem.need_tokens(phase)
    return [Parallel(tp, pp) for tp in model.tp_degrees if tp <= c.gpus_per_node
            for pp in range(1, c.num_gpus // tp + 1) if fits(model, Parallel(tp, pp), need)]


def score(problem: Problem, config: Parallel, phase: Phase, cache: Cache) -> Scored:
    """One instance's goodput in a phase-only simulation (memoized in ``cache``)."""
    key = (phase, config.tp, config.pp)
    if key not in cache:
        # A pipeline stage sees 1/pp of the work: the single-GPU goodput times the GPUs is a close hint.
        base = cache.get((phase, config.tp, 1))
        hint = base.goodput * config.pp if base and base.goodput > 0 else 1.0
        deployment = Disaggregated(config, 1, config, 1)
        g = find_goodput(deployment, problem.model, problem.trace, problem.slo, limits=problem.limits,
                         mode=phase, hint=hint)
        cache[key] = Scored(config, g.rate, g.simulations)
    return cache[key]


ALGORITHM2_UNITS_TRIED = 8  # units, best by phase-only goodput first, refined end to end for the cheapest


def rank(rate: float, goodput: float, gpus: int) -> tuple[float, float, int]:
    """Order of preference for a configuration of ``gpus`` GPUs sustaining ``goodput`` requests/s:
    the per-GPU goodput of enough replicas to reach ``rate`` (rate / GPUs deployed), then the
    per-GPU goodput of one instance (headroom), then fewer GPUs. For rates far above one instance's
    goodput this is the paper's per-GPU goodput; near it, it stops a 28-GPU instance from winning
    by a hair and then idling at a tenth of its capacity."""
    if goodput <= 0:
        return (0.0, 0.0, -gpus)
    deployed = rate / (math.ceil(rate / goodput) * gpus)
    return (round(deployed, 9), round(goodput / gpus, 9), -gpus)


def best(scored: list[Scored], rate: float, keep: Parallel | None = None, margin: float = 0.0) -> Scored:
    """The best by ``rank``; or ``keep``'s configuration where its deployed goodput per GPU is within
    ``margin`` of the best's."""
    top = max(scored, key=lambda s: rank(rate, s.goodput, s.config.gpus))
    kept = next((s for s in scored if s.config == keep and s.goodput > 0), None)
    if kept is not None and rank(rate, kept.goodput, kept.config.gpus)[0] >= \
            (1 - margin) * rank(rate, top.goodput, top.config.gpus)[0]:
        return kept
    return top


@dataclass(frozen=True)
class PhasePlan:
    phase: Phase
    config: Parallel
    instances: int
    instance_goodput: float  # requests/s one instance sustains in a phase-only simulation
    attainment: float  # phase-only SLO attainment of all instances at the target rate

    @property
    def gpus(self) -> int:
        return self.instances * self.config.gpus

    @property
    def per_gpu_goodput(self) -> float:
        return self.instance_goodput / self.config.gpus


@dataclass(frozen=True)
class Baseline:
    """The colocated (vLLM-style) deployment's best single-instance configuration, and that configuration
    replicated to the target rate behind the simulator's least-loaded dispatch (pooling helps it too)."""

    config: Parallel
    goodput: float  # requests/s of one instance
    instances: int  # to reach the target rate
    deployed_goodput: float = math.nan  # requests/s of `instances` instances together

    @property
    def per_gpu_goodput(self) -> float:
        return self.goodput / self.config.gpus

    @property
    def deployed_per_gpu_goodput(self) -> float:
        return self.deployed_goodput / (self.instances * self.config.gpus) if self.instances else math.nan


@dataclass(frozen=True)
class Plan:
    algorithm: Algorithm
    model: str
    hardware: str
    source: str
    rate: float
    slo: SLO
    cluster: Cluster
    prefill: PhasePlan
    decode: PhasePlan
    unit_goodput_per_gpu: float  # what the chosen configurations sustain per GPU, before rounding up
    kv_bandwidth: float  # bytes/s a decode instance pulls KV at (NVLink or the cross-node network)
    inter_node_stages: int = 1  # Algorithm 2: pipeline stages across nodes (each node: one segment of each)
    attainment: float = math.nan  # end-to-end (both phases, KV transfer) at the target rate
    goodput: float = math.nan  # end-to-end: the highest rate the planned deployment sustains
    baseline: Baseline | None = None
    simulations: int = 0
    search_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def gpus(self) -> int:
        return self.prefill.gpus + self.decode.gpus

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput / self.gpus

    @property
    def nodes_needed(self) -> int:
        per_node = self.cluster.gpus_per_node
        if self.algorithm == 1:
            return math.ceil(self.gpus / per_node)
        unit_per_node = (self.prefill.config.gpus + self.decode.config.gpus) // self.inter_node_stages
        return self.inter_node_stages * math.ceil(self.prefill.instances / (per_node // unit_per_node))

    @property
    def fits_cluster(self) -> bool:
        return self.gpus <= self.cluster.num_gpus and self.nodes_needed <= self.cluster.nodes

    def deployment(self) -> Disaggregated:
        return Disaggregated(self.prefill.config, self.prefill.instances, self.decode.config,
                             self.decode.instances, kv_bandwidth=self.kv_bandwidth)


def _phase_plan(problem: Problem, phase: Phase, s: Scored, instances: int) -> PhasePlan:
    d = Disaggregated(s.config, instances, s.config, instances)
    att = attainment_at(d, problem.model, problem.trace, problem.rate, problem.slo, limits=problem.limits,
                        mode=phase).attainment(problem.slo)
    return PhasePlan(phase, s.config, instances, s.goodput, att)


def _require(s: Scored, phase: str) -> None:
    if s.goodput <= 0:
        raise PlanError(f"no {phase} configuration meets the SLO at any rate (best tried: {s.config})")


def algorithm1(problem: Problem, cache: Cache) -> Plan:
    """High node-affinity: the best prefill and the best decode configuration, each replicated."""
    chosen: dict[Phase, Scored] = {}
    for phase in ("prefill", "decode"):
        configs = instance_configs(problem, phase)
        if not configs:
            raise PlanError(f"no {phase} configuration of {problem.model.model} fits in memory on this cluster")
        scored = [score(problem, c, phase, cache) for c in configs]
        if problem.keep is None:
            chosen[phase] = best(scored, problem.rate)
        else:
            keep = problem.keep.prefill if phase == "prefill" else problem.keep.decode
            chosen[phase] = best(scored, problem.rate, keep, problem.keep.margin)
        _require(chosen[phase], phase)
    p, d = chosen["prefill"], chosen["decode"]
    n, m = math.ceil(problem.rate / p.goodput), math.ceil(problem.rate / d.goodput)
    cluster = problem.cluster
    one_node = cluster.nodes == 1
    return Plan(
        algorithm=1, model=problem.model.model, hardware=problem.model.hardware, source=problem.model.source,
        rate=problem.rate, slo=problem.slo, cluster=cluster,
        prefill=_phase_plan(problem, "prefill", p, n), decode=_phase_plan(problem, "decode", d, m),
        unit_goodput_per_gpu=1.0 / (1.0 / p.per_gpu + 1.0 / d.per_gpu),
        kv_bandwidth=cluster.nvlink_bandwidth if one_node else cluster.network_bandwidth,
    )


def segments(problem: Problem) -> list[Parallel]:
    """Intra-node segments (tp, stages in one node) that fit a node's GPUs."""
    m = problem.cluster.gpus_per_node
    return [Parallel(tp, s) for tp in problem.model.tp_degrees if tp <= m for s in range(1, m // tp + 1)]


def unit_candidates(problem: Problem) -> Iterator[tuple[int, Parallel, Parallel]]:
    """(inter-node stages, prefill instance, decode instance) whose segments share each node."""
    segs = segments(problem)
    need_p, need_d = problem.need_tokens("prefill"), problem.need_tokens("decode")
    for inter in range(1, problem.cluster.nodes + 1):
        for sp in segs:
            for sd in segs:
                if sp.gpus + sd.gpus > problem.cluster.gpus_per_node:
                    continue
                p, d = Parallel(sp.tp, inter * sp.pp), Parallel(sd.tp, inter * sd.pp)
                if fits(problem.model, p, need_p) and fits(problem.model, d, need_d):
                    yield inter, p, d


def algorithm2(problem: Problem, cache: Cache) -> Plan:
    """Low node-affinity: replicate the unit (prefill + decode, stage segments co-located per node)
    with the highest per-GPU goodput, min(prefill, decode) / unit GPUs."""
    return algorithm2_plans(problem, cache, top=1)[0]


def algorithm2_plans(problem: Problem, cache: Cache, top: int) -> list[Plan]:
    """Algorithm 2's ``top`` best units by that ranking, each replicated to the target rate, best first."""
    ranked: list[tuple[tuple[float, float, int], int, Scored, Scored]] = []
    for inter, p, d in unit_candidates(problem):
        sp, sd = score(problem, p, "prefill", cache), score(problem, d, "decode", cache)
        ranked.append((rank(problem.rate, min(sp.goodput, sd.goodput), p.gpus + d.gpus), inter, sp, sd))
    if not ranked:
        raise PlanError(f"no prefill + decode pair of {problem.model.model} fits in memory within one node's "
                        f"{problem.cluster.gpus_per_node} GPUs per pipeline stage")
    ranked.sort(key=lambda r: r[0], reverse=True)
    _require(ranked[0][2], "prefill")
    _require(ranked[0][3], "decode")
    plans = []
    for _, inter, sp, sd in ranked[:top]:
        if min(sp.goodput, sd.goodput) <= 0:
            break  # ranked last: so are the rest
        units = math.ceil(problem.rate / min(sp.goodput, sd.goodput))
        plans.append(Plan(
            algorithm=2, model=problem.model.model, hardware=problem.model.hardware, source=problem.model.source,
            rate=problem.rate, slo=problem.slo, cluster=problem.cluster,
            prefill=_phase_plan(problem, "prefill", sp, units), decode=_phase_plan(problem, "decode", sd, units),
            unit_goodput_per_gpu=min(sp.goodput, sd.goodput) / (sp.config.gpus + sd.config.gpus),
            kv_bandwidth=problem.cluster.nvlink_bandwidth, inter_node_stages=inter,
        ))
    return plans


def colocated_baseline(problem: Problem, model: LatencyModel, tp_only: int | None = None) -> Baseline:
    """The best colocated deployment (tensor parallelism only, as vLLM ran): each configuration's instance
    goodput, then enough instances for the target rate simulated together; ranked by that deployment's
    per-GPU goodput (a single instance's can flatter a configuration that only just meets the SLO alone).
    ``tp_only``: that tensor-parallel degree alone (e.g. the one the paper's evaluation ran vLLM with)."""
    need = problem.need_tokens("decode")
    candidates: list[Baseline] = []
    if tp_only is not None and tp_only not in model.tp_degrees:
        raise PlanError(f"the baseline profile covers TP {sorted(model.tp_degrees)}, not {tp_only}")
    for tp in model.tp_degrees if tp_only is None else (tp_only,):
        config = Parallel(tp, 1)
        if tp > problem.cluster.gpus_per_node or not fits(model, config, need):
            continue
        g = find_goodput(Colocated(config), model, problem.trace, problem.slo, limits=problem.limits)
        if g.rate <= 0:
            candidates.append(Baseline(config, 0.0, 0, 0.0))
            continue
        instances = math.ceil(problem.rate / g.rate)
        deployed = g.rate if instances == 1 else find_goodput(
            Colocated(config, instances), model, problem.trace, problem.slo, limits=problem.limits,
            hint=problem.rate).rate
        candidates.append(Baseline(config, g.rate, instances, deployed))
    if not candidates:
        raise PlanError(f"no colocated configuration of {model.model} fits in memory")
    return max(candidates, key=lambda b: (round(b.deployed_per_gpu_goodput, 9) if b.instances else 0.0,
                                          round(b.per_gpu_goodput, 9), -b.config.gpus))


def end_to_end(problem: Problem, plan: Plan) -> float:
    """SLO attainment of the whole plan (prefill, KV transfer, decode) at the target rate."""
    result = attainment_at(plan.deployment(), problem.model, problem.trace, problem.rate, problem.slo,
                           limits=problem.limits)
    return result.attainment(problem.slo)


def _with_instances(problem: Problem, plan: Plan, prefill: int, decode: int) -> Plan:
    p, d = plan.prefill, plan.decode
    return replace(plan, prefill=_phase_plan(problem, "prefill", Scored(p.config, p.instance_goodput, 0), prefill),
                   decode=_phase_plan(problem, "decode", Scored(d.config, d.instance_goodput, 0), decode))


def refine(problem: Problem, plan: Plan, max_steps: int = 16) -> tuple[Plan, float, str | None]:
    """Add instances until the whole deployment meets the target end to end.

    Phase-only simulations miss one coupling: a decode instance short of KV memory leaves prompts'
    KV held on the prefill side, which stalls new prefills (TTFT). Algorithm 1 adds the prefill or
    the decode instance that helps more; Algorithm 2 adds whole units. Returns (plan, attainment, note)."""
    att = end_to_end(problem, plan)
    start = (plan.prefill.instances, plan.decode.instances)
    for _ in range(max_steps):
        if att >= problem.slo.attainment_target:
            break
        n, m = plan.prefill.instances, plan.decode.instances
        options = [(n + 1, m + 1)] if plan.algorithm == 2 else [(n, m + 1), (n + 1, m)]
        tried = [(end_to_end(problem, c), c) for c in (_with_instances(problem, plan, *o) for o in options)]
        att, plan = max(tried, key=lambda t: (t[0], -t[1].gpus))
    if (plan.prefill.instances, plan.decode.instances) == start:
        return plan, att, None
    return plan, att, (f"phase-only estimates gave {start[0]} prefill + {start[1]} decode instances; end to end "
                       f"(held KV backs up into prefill) it takes {plan.prefill.instances} + {plan.decode.instances}")


def cheaper_unit(problem: Problem, cache: Cache, plan: Plan, attainment: float, note: str | None
                 ) -> tuple[Plan, float, str | None]:
    """Algorithm 2 refines by whole units: when the best unit by phase-only goodput just misses the
    target end to end, a second unit can double the GPUs. The next best units, refined the same way,
    may meet it with fewer (OPT-13B at 20 req/s: one 8-GPU unit instead of two 7-GPU ones)."""
    met = attainment >= problem.slo.attainment_target
    best: tuple[float, float] = (plan.gpus, -attainment) if met else (math.inf, 0.0)
    chosen: tuple[Plan, float] | None = None
    for other in algorithm2_plans(problem, cache, top=ALGORITHM2_UNITS_TRIED)[1:]:
        if other.prefill.config.gpus + other.decode.config.gpus >= best[0]:
            continue  # one unit of it is already no cheaper
        refined, att, _ = refine(problem, other)
        if att >= problem.slo.attainment_target and (refined.gpus, -att) < best:
            best, chosen = (refined.gpus, -att), (refined, att)
    if chosen is None:
        return plan, attainment, note
    refined, att = chosen
    p, d = refined.prefill, refined.decode
    return refined, att, (f"the best unit by phase-only goodput takes {plan.gpus} GPUs end to end "
                          f"({attainment:.1%}); {p.instances} x (prefill {p.config} + decode {d.config}) meets "
                          f"the target with {refined.gpus}")


def plan_placement(problem: Problem, algorithm: Literal[1, 2, "auto"] = "auto",
                   baseline_model: LatencyModel | None = None, baseline_tp: int | None = None) -> Plan:
    """Run the chosen algorithm ("auto": Algorithm 1 when its plan meets the SLO end to end with KV
    over the cluster's links, else Algorithm 2), refine it end to end and add the baseline."""
    start = time.perf_counter()
    cache: Cache = {}
    notes: list[str] = []
    if algorithm == "auto":
        plan = algorithm1(problem, cache)
        att = end_to_end(problem, plan)
        if problem.cluster.nodes > 1 and att < problem.slo.attainment_target:
            notes.append(f"Algorithm 1's plan attains {att:.1%} end to end with KV over the "
                         f"{problem.cluster.network_bandwidth * 8 / 1e9:g} Gbps network: Algorithm 2 chosen")
            plan = algorithm2(problem, cache)
    else:
        plan = algorithm1(problem, cache) if algorithm == 1 else algorithm2(problem, cache)
    plan, attainment, note = refine(problem, plan)
    if plan.algorithm == 2:
        plan, attainment, note = cheaper_unit(problem, cache, plan, attainment, note)
    notes += [note] if note else []
    base = colocated_baseline(problem, baseline_model, baseline_tp) if baseline_model else None
    if not plan.fits_cluster:
        notes.append(f"the plan needs {plan.gpus} GPUs on {plan.nodes_needed} nodes; the cluster has "
                     f"{problem.cluster.num_gpus} on {problem.cluster.nodes}")
    full = find_goodput(plan.deployment(), problem.model, problem.trace, problem.slo, limits=problem.limits,
                        hint=problem.rate)
    return replace(plan, attainment=attainment, goodput=full.rate, baseline=base, notes=notes,
                   simulations=sum(s.simulations for s in cache.values()),
                   search_seconds=time.perf_counter() - start)

"""Placement: only feasible configurations, the best of them (checked by brute force), seeds, baseline."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from services.planner.goodput import find_goodput
from services.planner.latency import LatencyModel
from services.planner.placement import (
    Baseline,
    Cache,
    PlanError,
    Problem,
    algorithm1,
    algorithm2,
    cheaper_unit,
    end_to_end,
    plan_placement,
)
from services.planner.report import plan_to_dict, print_plan
from services.planner.simulator import Disaggregated, Parallel
from services.planner.specs import Cluster
from services.planner.workload import make_trace, synthetic_lengths
from shared.workloads import SLO
from tests.planner.conftest import toy_model

SLO_ = SLO(ttft_s=0.2, tpot_s=0.03)
# 1 GPU holds 1000 KV tokens: prefill (needs 500) fits everywhere, decode (needs 821) only from 2 GPUs up
CAPACITY = {(tp, pp): 1000 * tp * pp - (700 if tp * pp == 1 else 0) for tp in (1, 2) for pp in range(1, 9)}


def problem(model: LatencyModel, rate: float = 30.0, nodes: int = 2, gpus: int = 2) -> Problem:
    trace = make_trace(synthetic_lengths(500, 320), 300, seed=0)
    return Problem(model, Cluster(nodes, gpus), SLO_, rate, trace)


def deployed_per_gpu(rate: float, goodput: float, gpus: int) -> float:
    return 0.0 if goodput <= 0 else rate / (math.ceil(rate / goodput) * gpus)


def phase_goodput(p: Problem, config: Parallel, phase: str) -> float:
    return find_goodput(Disaggregated(config, 1, config, 1), p.model, p.trace, p.slo, mode=phase).rate  # type: ignore[arg-type]


def test_algorithm1_is_the_brute_force_best_among_feasible_configs() -> None:
    model = toy_model(tps=(1, 2), capacity=CAPACITY)
    p = problem(model)
    plan = algorithm1(p, {})
    for phase, chosen, need in (("prefill", plan.prefill, 500), ("decode", plan.decode, 821)):
        # every (tp, pp) the 2x2 cluster can hold, judged by hand
        feasible = [Parallel(tp, pp) for tp, pp in itertools.product((1, 2), (1, 2, 3, 4))
                    if tp * pp <= 4 and CAPACITY[(tp, pp)] >= need]
        if phase == "decode":
            assert Parallel(1, 1) not in feasible
        scores = {c: deployed_per_gpu(p.rate, phase_goodput(p, c, phase), c.gpus) for c in feasible}
        assert chosen.config in feasible
        assert scores[chosen.config] == pytest.approx(max(scores.values()), rel=1e-6)
        assert chosen.instances == math.ceil(p.rate / chosen.instance_goodput)


def test_algorithm2_is_the_brute_force_best_pair_per_node() -> None:
    model = toy_model(tps=(1, 2), capacity=CAPACITY)
    p = problem(model, gpus=4)
    plan = algorithm2(p, {})
    best = 0.0
    for inter in (1, 2):
        for (tp_p, s_p), (tp_d, s_d) in itertools.product(itertools.product((1, 2), (1, 2, 3, 4)), repeat=2):
            if tp_p * s_p + tp_d * s_d > 4:
                continue  # a stage's prefill and decode segments must share one node
            pc, dc = Parallel(tp_p, inter * s_p), Parallel(tp_d, inter * s_d)
            if CAPACITY.get((pc.tp, pc.pp), 0) < 500 or CAPACITY.get((dc.tp, dc.pp), 0) < 821:
                continue
            g = min(phase_goodput(p, pc, "prefill"), phase_goodput(p, dc, "decode"))
            best = max(best, deployed_per_gpu(p.rate, g, pc.gpus + dc.gpus))
    unit_gpus = plan.prefill.config.gpus + plan.decode.config.gpus
    assert plan.prefill.instances == plan.decode.instances
    got = deployed_per_gpu(p.rate, min(plan.prefill.instance_goodput, plan.decode.instance_goodput), unit_gpus)
    assert got == pytest.approx(best, rel=1e-6)
    per_node = (plan.prefill.config.gpus + plan.decode.config.gpus) // plan.inter_node_stages
    assert per_node <= 4 and plan.inter_node_stages <= 2  # one stage's segments share a node


def test_algorithm2_takes_a_cheaper_unit_when_the_best_one_needs_more_end_to_end() -> None:
    model = toy_model(tps=(1, 2))
    p = problem(model, rate=10.0, nodes=2, gpus=8)
    cache: Cache = {}
    best = algorithm2(p, cache)
    # As if the end-to-end refinement had had to add two more units of the best one:
    costly = replace(best, prefill=replace(best.prefill, instances=best.prefill.instances + 2),
                     decode=replace(best.decode, instances=best.decode.instances + 2))
    plan, att, note = cheaper_unit(p, cache, costly, 1.0, "refined")
    assert plan.gpus < costly.gpus and plan.algorithm == 2
    assert (plan.prefill.config, plan.decode.config) != (best.prefill.config, best.decode.config)
    assert att >= SLO_.attainment_target and end_to_end(p, plan) == pytest.approx(att)
    assert note is not None and f"meets the target with {plan.gpus}" in note
    # Nothing cheaper than the cheapest: the plan and its note stay.
    assert cheaper_unit(p, cache, plan, att, "kept") == (plan, att, "kept")


def test_nothing_fits_in_memory_is_a_clear_error() -> None:
    model = toy_model(tps=(1,), capacity={(1, pp): 100 for pp in range(1, 5)})
    with pytest.raises(PlanError, match="fits in memory"):
        algorithm1(problem(model), {})


def test_pipeline_depth_is_capped_by_the_profile() -> None:
    model = toy_model(tps=(1, 2), capacity=CAPACITY, max_pp=1)
    plan = algorithm1(problem(model), {})
    assert plan.prefill.config.pp == plan.decode.config.pp == 1


def test_plan_is_deterministic_and_beats_the_colocated_baseline() -> None:
    model = toy_model(tps=(1, 2))  # roomy memory: held KV never backs up into prefill
    p = problem(model, rate=10.0, nodes=2, gpus=8)
    a, b = plan_placement(p, "auto", model), plan_placement(p, "auto", model)
    da, db = plan_to_dict(a), plan_to_dict(b)
    da.pop("search_seconds")
    db.pop("search_seconds")
    assert da == db
    assert a.attainment >= SLO_.attainment_target and a.fits_cluster
    assert a.baseline is not None and a.baseline.per_gpu_goodput > 0
    assert a.goodput >= p.rate * 0.98  # the planned deployment sustains the target rate end to end
    # The baseline replicated to the rate is simulated whole (least-loaded dispatch), not just multiplied out.
    base = a.baseline
    assert base.instances >= 1 and base.instances * base.goodput >= p.rate
    assert a.gpus < base.instances * base.config.gpus  # fewer GPUs serve the target rate disaggregated
    assert base.deployed_goodput >= p.rate * 0.98
    assert da["baseline"]["deployed_goodput_per_gpu"] == round(base.deployed_per_gpu_goodput, 4)


def test_the_baseline_can_be_held_to_one_tensor_parallel_degree(capsys: pytest.CaptureFixture[str]) -> None:
    model = toy_model(tps=(1, 2))
    p = problem(model, rate=10.0, nodes=2, gpus=8)
    plan = plan_placement(p, "auto", model, baseline_tp=2)
    assert plan.baseline is not None and plan.baseline.config.tp == 2
    with pytest.raises(PlanError, match="not 4"):
        plan_placement(p, "auto", model, baseline_tp=4)
    # A baseline that meets the SLO at no rate is reported as such, not as a ratio (nor a crash).
    hopeless = replace(plan, baseline=Baseline(Parallel(1), 0.0, 0, 0.0))
    print_plan(hopeless)
    assert "meets the SLO at no rate" in capsys.readouterr().out
    assert "speedup_per_gpu" not in plan_to_dict(hopeless)

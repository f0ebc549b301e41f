"""A Plan as data (JSON, YAML) and as a table for people."""

from __future__ import annotations

import json
import math
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from services.planner.placement import PhasePlan, Plan
from shared.protocol import PhaseShape, PlanMessage


def _num(x: float, digits: int = 4) -> float | None:
    return None if math.isnan(x) else round(x, digits)


def _phase(p: PhasePlan) -> dict[str, Any]:
    return {"tp": p.config.tp, "pp": p.config.pp, "instances": p.instances, "gpus": p.gpus,
            "instance_goodput": _num(p.instance_goodput), "goodput_per_gpu": _num(p.per_gpu_goodput),
            "attainment": _num(p.attainment)}


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": plan.model, "hardware": plan.hardware, "profile": plan.source, "algorithm": plan.algorithm,
        "rate": plan.rate,
        "slo": {"ttft": plan.slo.ttft_s, "tpot": plan.slo.tpot_s, "attainment": plan.slo.attainment_target},
        "cluster": {"nodes": plan.cluster.nodes, "gpus_per_node": plan.cluster.gpus_per_node},
        "prefill": _phase(plan.prefill), "decode": _phase(plan.decode),
        "gpus": plan.gpus, "nodes_needed": plan.nodes_needed, "fits_cluster": plan.fits_cluster,
        "kv_bandwidth_gbps": round(plan.kv_bandwidth * 8 / 1e9, 3),
        "unit_goodput_per_gpu": _num(plan.unit_goodput_per_gpu),
        "goodput": _num(plan.goodput), "goodput_per_gpu": _num(plan.goodput_per_gpu),
        "attainment": _num(plan.attainment),
        "baseline": None, "simulations": plan.simulations, "search_seconds": round(plan.search_seconds, 3),
        "notes": list(plan.notes),
    }
    if plan.baseline:
        b = plan.baseline
        out["baseline"] = {"kind": "colocated", "tp": b.config.tp, "pp": b.config.pp, "instances": b.instances,
                           "gpus": b.instances * b.config.gpus, "instance_goodput": _num(b.goodput),
                           "goodput_per_gpu": _num(b.per_gpu_goodput), "deployed_goodput": _num(b.deployed_goodput),
                           "deployed_goodput_per_gpu": _num(b.deployed_per_gpu_goodput)}
        if b.per_gpu_goodput > 0:
            out["speedup_per_gpu"] = _num(plan.goodput_per_gpu / b.per_gpu_goodput, 3)
        if b.deployed_per_gpu_goodput > 0:
            out["speedup_per_gpu_deployed"] = _num(plan.goodput_per_gpu / b.deployed_per_gpu_goodput, 3)
    return out


def plan_message(plan: Plan, reason: str, observed_rate: float, at: float) -> PlanMessage:
    """The plan as the online planner publishes it."""
    def shape(p: PhasePlan) -> PhaseShape:
        return PhaseShape(tp=p.config.tp, pp=p.config.pp, instances=p.instances, gpus=p.gpus)

    speedup = None
    if plan.baseline and plan.baseline.per_gpu_goodput > 0:
        speedup = _num(plan.goodput_per_gpu / plan.baseline.per_gpu_goodput, 3)
    return PlanMessage(model=plan.model, hardware=plan.hardware, rate=plan.rate, gpus=plan.gpus,
                       prefill=shape(plan.prefill), decode=shape(plan.decode),
                       goodput_per_gpu=_num(plan.goodput_per_gpu), speedup_per_gpu=speedup, reason=reason,
                       observed_rate=observed_rate, at=at)


def plan_json(plan: Plan) -> str:
    return json.dumps(plan_to_dict(plan), indent=2)


def plan_yaml(plan: Plan) -> str:
    return yaml.safe_dump(plan_to_dict(plan), sort_keys=False)


def print_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or Console()
    d = plan_to_dict(plan)
    title = (f"{plan.model} on {plan.cluster.nodes}x{plan.cluster.gpus_per_node} {plan.hardware} "
             f"({plan.source}), {plan.rate:g} req/s, TTFT {plan.slo.ttft_s:g} s / TPOT {plan.slo.tpot_s:g} s "
             f"at {plan.slo.attainment_target:.0%}: Algorithm {plan.algorithm}")
    table = Table(title=title, caption="goodput: req/s one instance (end to end: the whole deployment) "
                  "sustains at the SLO; attain: SLO attainment at the target rate")
    for col in ("", "TP", "PP", "inst", "GPUs", "goodput", "per GPU", "attain"):
        table.add_column(col, justify="left" if not col else "right")
    for name in ("prefill", "decode"):
        p = d[name]
        table.add_row(name, str(p["tp"]), str(p["pp"]), str(p["instances"]), str(p["gpus"]),
                      f"{p['instance_goodput']:.2f}", f"{p['goodput_per_gpu']:.3f}", f"{p['attainment']:.1%}")
    table.add_row("end to end", "", "", "", str(plan.gpus), f"{plan.goodput:.2f}",
                  f"{plan.goodput_per_gpu:.3f}", f"{plan.attainment:.1%}", style="bold")
    if plan.baseline:
        b = d["baseline"]
        table.add_row("colocated", str(b["tp"]), str(b["pp"]), "1", str(b["tp"] * b["pp"]),
                      f"{b['instance_goodput']:.2f}", f"{b['goodput_per_gpu']:.3f}", "")
        if b["deployed_goodput_per_gpu"] is not None:  # None when no instance meets the SLO at any rate
            table.add_row("colocated, replicated", str(b["tp"]), str(b["pp"]), str(b["instances"]), str(b["gpus"]),
                          f"{b['deployed_goodput']:.2f}", f"{b['deployed_goodput_per_gpu']:.3f}", "")
    console.print(table)
    lines = [f"KV transfer at {d['kv_bandwidth_gbps']:g} Gbps; {plan.gpus} GPUs on {plan.nodes_needed} node(s)"
             f"{'' if plan.fits_cluster else ' (does NOT fit the cluster)'}; "
             f"{plan.simulations} simulations in {plan.search_seconds:.1f} s"]
    if "speedup_per_gpu" in d:
        lines.append(f"per-GPU goodput vs colocated: {d['speedup_per_gpu']:.2f}x against one instance"
                     + (f", {d['speedup_per_gpu_deployed']:.2f}x against {d['baseline']['instances']} replicated to "
                        f"the rate" if "speedup_per_gpu_deployed" in d else ""))
    elif plan.baseline:
        lines.append(f"the colocated baseline (TP{d['baseline']['tp']}) meets the SLO at no rate: no ratio")
    for line in lines + [f"note: {n}" for n in plan.notes]:
        console.print(line)

"""`distserve bench scale`: how far this machine's control plane (gateway, NATS, Redis) carries emulated
GPU instances before its own overhead shows in the latencies.

For each instance count N (half prefill, half decode, TP1 emulated GPUs of the chosen model) it starts a
fresh stack, sends N x `--rate-per-instance` requests/s of fixed lengths, and replays the same requests
through the simulator, which has no overhead at all: the stack's p50 TTFT and TPOT over the simulator's
is the control plane's cost at that size. Each process's CPU use during the run names the bottleneck
(a process near one core is saturated). The emulated engine only sleeps, so the workers' own CPU is
the serving path (scheduling, hand-off, streaming) and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from services.bench import report
from services.bench.compare import PLAN_LIMITS, against_simulator, run_deployment
from services.bench.serve import add_workload_args, analyze, default_output_dir, save, slo_from_args
from services.planner.args import profiles_for
from services.planner.deployment import PlannedDeployment
from shared.argtypes import positive_float, positive_int, positive_ints
from shared.config import deep_merge, load_settings
from shared.engine.precision import cpu_model
from shared.servers import free_port
from shared.workloads import SLO, WorkloadRequest

OVERHEAD_LIMIT = 0.05  # the control plane "carries" a size while p50 TTFT and TPOT stay within 5% of the simulator's


@dataclass(frozen=True)
class ScalePoint:
    instances: int
    rate: float
    requests: int
    ttft_p50: float  # seconds, through the stack
    ttft_p50_simulated: float
    tpot_p50: float
    tpot_p50_simulated: float
    cpu: dict[str, float]  # share of one core each process used during the run (workers summed)

    @property
    def ttft_overhead(self) -> float:
        return self.ttft_p50 / self.ttft_p50_simulated - 1

    @property
    def tpot_overhead(self) -> float:
        return self.tpot_p50 / self.tpot_p50_simulated - 1

    @property
    def carried(self) -> bool:
        return max(self.ttft_overhead, self.tpot_overhead) <= OVERHEAD_LIMIT

    @property
    def busiest(self) -> tuple[str, float]:
        return max(self.cpu.items(), key=lambda kv: kv[1])


def deployment(model: str, instances: int, rate: float) -> PlannedDeployment:
    half = max(1, instances // 2)
    return PlannedDeployment.model_validate({
        "model": model, "hardware": "a100", "profile": "reference:distserve", "rate": rate,
        "prefill": {"tp": 1, "instances": half}, "decode": {"tp": 1, "instances": half}, "kv_bandwidth_gbps": 2400})


def fixed_requests(count: int, input_tokens: int, output_tokens: int) -> list[WorkloadRequest]:
    return [WorkloadRequest([100 + (i * 31 + k) % 10_000 for k in range(input_tokens)], input_tokens, output_tokens)
            for i in range(count)]


def cpu_shares(cpu_seconds: dict[str, float], seconds: float) -> dict[str, float]:
    """Each process's share of one core; the workers summed as one entry."""
    shares: dict[str, float] = {}
    for name, used in cpu_seconds.items():
        key = "workers" if name.startswith(("prefill-", "decode-")) else name
        shares[key] = shares.get(key, 0.0) + used / max(seconds, 1e-9)
    return shares


def run_point(args: argparse.Namespace, instances: int, slo: SLO, out: Path, say: Console) -> ScalePoint:
    rate = instances * args.rate_per_instance
    plan = deployment(args.model, instances, rate)
    limits = {"max_num_seqs": PLAN_LIMITS.max_batch, "max_num_batched_tokens": PLAN_LIMITS.prefill_token_budget}
    settings = load_settings(deep_merge(plan.overrides(), {
        "nats_url": None, "redis_url": None, "gateway": {"port": free_port()}, "prefill": limits, "decode": limits}))
    point_args = copy.copy(args)
    point_args.rate = (rate,)
    name = f"plan-{instances}"
    requests = fixed_requests(args.num_requests, args.input_tokens, args.output_tokens)
    measured = run_deployment(name, settings, point_args, requests, slo, None, say.log)
    result = analyze("plan", measured.records, slo)
    save(result, out / "plan", {"instances": instances, "rate": rate}, with_plots=False)
    (planned,) = against_simulator(plan, [result], out, slo)
    (point,) = planned.points
    (out / "plan").rename(out / name)
    return ScalePoint(instances, rate, point.requests, point.measured_ttft, point.predicted_ttft,
                      point.measured_tpot, point.predicted_tpot,
                      cpu_shares(measured.cpu_seconds, measured.sweep_seconds))


def table(points: Sequence[ScalePoint]) -> Table:
    t = Table(title=f"control plane at scale: p50 through the stack vs simulated (no overhead), CPU share of one "
                    f"core per process; {cpu_model()}, {os.cpu_count()} cores")
    for column in ("instances", "req/s", "TTFT p50 ms stack / sim", "TTFT +%", "TPOT p50 ms stack / sim",
                   "TPOT +%", "gateway", "nats", "redis", "workers", "client", "within 5%"):
        t.add_column(column, justify="right")
    for p in points:
        c = p.cpu
        t.add_row(str(p.instances), f"{p.rate:g}", f"{p.ttft_p50 * 1e3:.1f} / {p.ttft_p50_simulated * 1e3:.1f}",
                  f"{100 * p.ttft_overhead:+.1f}", f"{p.tpot_p50 * 1e3:.1f} / {p.tpot_p50_simulated * 1e3:.1f}",
                  f"{100 * p.tpot_overhead:+.1f}", f"{c.get('gateway', 0):.0%}", f"{c.get('nats-server', 0):.0%}",
                  f"{c.get('redis-server', 0):.0%}", f"{c.get('workers', 0):.0%}",
                  f"{c.get('load generator', 0):.0%}", "yes" if p.carried else "no")
    return t


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("scale", help="how many emulated GPU instances and req/s the control plane carries "
                              "before its overhead moves p50 TTFT or TPOT by 5%",
                              description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--instances", type=positive_ints, default=[2, 4, 8, 16], help="instance counts (default "
                   "2,4,8,16), half prefill and half decode")
    p.add_argument("--rate-per-instance", type=positive_float, default=1.0, help="req/s per instance (default 1)")
    p.add_argument("--model", default="opt-13b", help="a reference profile's model (default opt-13b)")
    p.add_argument("--input-tokens", type=positive_int, default=512)
    p.add_argument("--output-tokens", type=positive_int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--log-level", default="WARNING")
    add_workload_args(p)
    p.set_defaults(func=main, workload="sharegpt", api="completions")


def main(args: argparse.Namespace) -> int:
    console, err = Console(), Console(stderr=True)
    try:  # a model without a reference profile, or a bad SLO, fails here: before any stack starts
        slo = slo_from_args(args)
        profiles_for(args.model, "a100", "reference")
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        return 2
    out: Path = args.output_dir or default_output_dir("scale", "fixed")
    points: list[ScalePoint] = []
    for n in args.instances:
        try:
            points.append(run_point(args, n, slo, out, err))
        except RuntimeError as e:
            err.print(f"[red]{n} instances failed:[/red] {e}")
            break
        err.log(f"{n} instances at {points[-1].rate:g} req/s: TTFT {100 * points[-1].ttft_overhead:+.1f}%, "
                f"TPOT {100 * points[-1].tpot_overhead:+.1f}%, busiest {points[-1].busiest[0]}")
    if not points:
        return 1
    console.print(table(points))
    carried = [p for p in points if p.carried]
    with contextlib.suppress(ValueError):
        top = max(carried, key=lambda p: p.instances)
        console.print(f"carried: {top.instances} instances at {top.rate:g} req/s within 5% of the simulator")
    report.write_summary({"command": "scale", "cpu": cpu_model(), "points": [
        {**asdict(p), "ttft_overhead": p.ttft_overhead, "tpot_overhead": p.tpot_overhead, "carried": p.carried}
        for p in points]}, out)
    return 0

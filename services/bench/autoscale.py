"""`distserve bench autoscale`: a plan held fixed vs the online planner acting, on traffic that shifts.

Both runs start what `--plan` planned, on emulated GPUs, and get the same trace: phases of a given rate
and prompt mix (`--phases 2:60,6:90:long,2:60`: 2 req/s for 60 s, then 6 req/s of long prompts for 90 s,
then 2 req/s again; ShareGPT lengths as the planner counts them, `long` keeping prompts of 1024 tokens
or more). In the `fixed` run the deployment stays as planned; in the `autoscaled` run the online
planner replans from the traffic and the actuator starts and drains workers (`up --autoscale`). Printed
and drawn (autoscale.png): SLO attainment over time and the GPUs in use, with each run's GPU-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from services.bench import plots, report
from services.bench.arrivals import arrival_times
from services.bench.client import ClientConfig, discover_model, make_http_client
from services.bench.compare import PLAN_LIMITS
from services.bench.loadgen import Run, run_load
from services.bench.metrics import RequestRecord, meets_slo
from services.bench.serve import default_output_dir
from services.launcher import Stack
from services.planner.deployment import PlannedDeployment
from services.planner.workload import load_lengths
from shared.argtypes import non_negative_float, positive_float
from shared.config import deep_merge, load_settings
from shared.engine.precision import cpu_model
from shared.servers import free_port
from shared.workloads import SLO, WorkloadRequest

LONG_PROMPT = 1024
BIN_S = 10.0  # attainment over time, in bins of this many seconds of arrivals


@dataclass(frozen=True)
class Phase:
    rate: float
    seconds: float
    long: bool = False


def parse_phases(text: str) -> list[Phase]:
    phases = []
    for part in text.split(","):
        fields = part.strip().split(":")
        try:
            if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] != "long"):
                raise ValueError
            phase = Phase(float(fields[0]), float(fields[1]), len(fields) == 3)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected RATE:SECONDS[:long], e.g. 6:90:long; got {part!r}") from None
        if phase.rate <= 0 or phase.seconds <= 0:
            raise argparse.ArgumentTypeError(f"rate and seconds must be positive: {part!r}")
        phases.append(phase)
    return phases


def shifting_trace(phases: Sequence[Phase], seed: int) -> tuple[list[WorkloadRequest], list[float]]:
    """Requests (token-id prompts of ShareGPT lengths) and their send times, phase after phase."""
    lengths = load_lengths("sharegpt", max_total_tokens=2048, tokenizer="opt")
    pairs = list(zip(lengths.inputs.tolist(), lengths.outputs.tolist(), strict=True))
    rng = random.Random(seed)
    requests: list[WorkloadRequest] = []
    arrivals: list[float] = []
    start = 0.0
    for k, phase in enumerate(phases):
        pool = [pair for pair in pairs if pair[0] >= LONG_PROMPT] if phase.long else pairs
        times = [t for t in arrival_times(max(1, int(phase.rate * phase.seconds * 2)), phase.rate, seed=seed + k)
                 if t < phase.seconds]
        for t in times:
            n, m = rng.choice(pool)
            requests.append(WorkloadRequest([100 + (len(requests) * 31 + j) % 10_000 for j in range(n)], n, m))
            arrivals.append(start + t)
        start += phase.seconds
    return requests, arrivals


@dataclass
class Measured:
    label: str
    records: list[RequestRecord]
    gpus: list[tuple[float, int]]  # (seconds since the start, GPUs of the live workers)
    actions: int
    moved: int  # queued prefills given back to run on a worker that joined (gateway.rebalance_on_join)

    @property
    def gpu_seconds(self) -> float:
        return sum((t1 - t0) * g for (t0, g), (t1, _) in zip(self.gpus, self.gpus[1:], strict=False))


def live_gpus(url: str) -> int | None:
    """GPUs of the workers the gateway at `url` sees; None if it does not answer."""
    try:
        return gpus_in(httpx.get(f"{url}/metrics", timeout=2).text)
    except httpx.HTTPError:
        return None


def gpus_in(metrics: str) -> int:
    """GPUs of the live workers in a gateway's /metrics: tp x pp each, from distserve_worker_info."""
    return sum(int(sample.labels["tp"]) * int(sample.labels["pp"]) for family in text_string_to_metric_families(metrics)
               if family.name == "distserve_worker_info" for sample in family.samples)


def prefills_moved(metrics: str) -> int:
    """Requests that migrated in the prefill phase, from a gateway's /metrics (no worker dies here: each was
    given back from a queue to run on a worker that joined)."""
    return int(sum(sample.value for family in text_string_to_metric_families(metrics)
                   if family.name == "distserve_migrations" for sample in family.samples
                   if sample.name == "distserve_migrations_total" and sample.labels.get("role") == "prefill"))


def run_one(label: str, plan: PlannedDeployment, autoscale: bool, requests: Sequence[WorkloadRequest],
            arrivals: Sequence[float], slo: SLO, args: argparse.Namespace, say: Console) -> Measured:
    limits = {"max_num_seqs": PLAN_LIMITS.max_batch, "max_num_batched_tokens": PLAN_LIMITS.prefill_token_budget}
    settings = load_settings(deep_merge(plan.overrides(), {
        "nats_url": None, "redis_url": None, "prefill": limits, "decode": limits,
        "gateway": {"port": free_port(), "slo_ttft_s": slo.ttft_s, "slo_tpot_s": slo.tpot_s},
        "autoscale": {"enabled": autoscale, "window_s": args.window, "interval_s": args.interval,
                      "cooldown_s": args.cooldown, "scale_down_after_s": args.scale_down_after}}))
    stack = Stack(settings, args.log_level, announce=False, plan=plan)
    stop = threading.Event()
    gpus: list[tuple[float, int]] = []
    try:
        stack.start()
        stack.wait_ready(args.ready_timeout)
        say.log(f"{label}: ready at {stack.url}")
        start = time.monotonic()

        def supervise() -> None:  # what `up` does: restarts, and following the plans (--autoscale)
            while not stop.is_set():
                stack.supervise(time.monotonic())
                seen = live_gpus(stack.url)
                if seen is not None:
                    gpus.append((time.monotonic() - start, seen))
                stop.wait(1.0)

        watcher = threading.Thread(target=supervise, name="supervise", daemon=True)
        watcher.start()
        model = asyncio.run(discover_model(stack.url))
        client = ClientConfig(base_url=stack.url, model=model, api="completions", ignore_eos=True,
                              request_timeout_s=args.request_timeout)

        async def load() -> list[RequestRecord]:
            async with make_http_client(client) as http:
                return await run_load(http, client, Run(0.0, requests, arrivals, arrivals[-1] + args.tail))

        records = asyncio.run(load())
        stop.set()
        watcher.join(timeout=10)
        actions = len(stack.autoscaler.decisions) if stack.autoscaler is not None else 0
        return Measured(label, records, gpus, actions, prefills_moved(httpx.get(f"{stack.url}/metrics").text))
    finally:
        stop.set()
        stack.stop()


def attainment_over_time(records: Sequence[RequestRecord], slo: SLO, end: float) -> list[tuple[float, float]]:
    """(bin start, share of the requests sent in it that met both SLOs)."""
    bins = []
    t = 0.0
    while t < end:
        sent = [r for r in records if r.sent_s is not None and t <= r.scheduled_s < t + BIN_S]
        if sent:
            bins.append((t, sum(meets_slo(r, slo) for r in sent) / len(sent)))
        t += BIN_S
    return bins


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("autoscale", help="a fixed plan vs the online planner acting, on shifting traffic "
                              "(emulated GPUs): attainment over time and GPU-seconds",
                              description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--plan", type=Path, required=True, help="what both runs start (`distserve plan --yaml`)")
    p.add_argument("--phases", type=parse_phases, default=parse_phases("2:60,6:90:long,2:90"),
                   help="RATE:SECONDS[:long],... (default 2:60,6:90:long,2:90)")
    p.add_argument("--window", type=positive_float, default=20.0, help="the planner's window, seconds (default 20)")
    p.add_argument("--interval", type=positive_float, default=5.0, help="seconds between its evaluations (default 5)")
    p.add_argument("--cooldown", type=non_negative_float, default=15.0, help="the actuator's cool-down (default 15)")
    p.add_argument("--scale-down-after", type=non_negative_float, default=30.0, help="a lower plan must hold this long "
                   "(default 30)")
    p.add_argument("--tail", type=positive_float, default=60.0, help="seconds after the last send to let requests end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=positive_float, default=300.0)
    p.add_argument("--ready-timeout", type=positive_float, default=300.0)
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--output-dir", type=Path)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    console, err = Console(), Console(stderr=True)
    try:
        plan = PlannedDeployment.load(args.plan)
        if plan.slo is None:
            raise ValueError("the plan records no SLO")
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        return 2
    slo = SLO(plan.slo.ttft, plan.slo.tpot, plan.slo.attainment)
    requests, arrivals = shifting_trace(args.phases, args.seed)
    end = sum(p.seconds for p in args.phases)
    runs = [run_one(label, plan, label == "autoscaled", requests, arrivals, slo, args, err)
            for label in ("fixed", "autoscaled")]
    out: Path = args.output_dir or default_output_dir("autoscale", "sharegpt")
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_scaling_runs(
        {run.label: (attainment_over_time(run.records, slo, end), run.gpus, run.gpu_seconds) for run in runs},
        slo, BIN_S, [sum(p.seconds for p in args.phases[:i + 1]) for i in range(len(args.phases) - 1)],
        "fixed plan vs the online planner acting (phases: "
        + ", ".join(f"{p.rate:g} req/s{' long' if p.long else ''}" for p in args.phases) + ")",
        out / "autoscale.png")
    table = Table(title=f"{len(requests)} requests over {end:g} s, {plan.model} on emulated {plan.hardware} "
                        f"({cpu_model()})")
    for column in ("run", "attainment", *(f"phase {i + 1}" for i in range(len(args.phases))), "GPU-seconds",
                   "scaling actions", "prefills moved"):
        table.add_column(column, justify="right")
    bounds = [sum(p.seconds for p in args.phases[:i]) for i in range(len(args.phases) + 1)]
    for run in runs:
        per_phase = []
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            chosen = [r for r in run.records if lo <= r.scheduled_s < hi]
            per_phase.append(f"{sum(meets_slo(r, slo) for r in chosen) / max(1, len(chosen)):.0%}")
        overall = sum(meets_slo(r, slo) for r in run.records) / len(run.records)
        table.add_row(run.label, f"{overall:.1%}", *per_phase, f"{run.gpu_seconds:.0f}", str(run.actions),
                      str(run.moved))
    console.print(table)
    for run in runs:
        report.write_records(run.records, out / run.label)
    report.write_summary({"command": "autoscale", "phases": [vars(p) for p in args.phases], "runs": [
        {"label": r.label, "gpu_seconds": r.gpu_seconds, "actions": r.actions, "prefills_moved": r.moved,
         "gpus": r.gpus,
         "attainment_over_time": attainment_over_time(r.records, slo, end)} for r in runs]}, out)
    console.print(f"results: {out}/ (autoscale.png)")
    return 0

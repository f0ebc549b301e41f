"""`distserve bench compare`: the goodput of disaggregated vs colocated serving on the same cores.

Starts each deployment in turn as its own fresh stack (own nats-server, redis-server, workers and
gateway), runs the same seeded workload and arrival pattern against it with `bench serve`'s sweep,
records where each request spent its time (the phase timestamps the services keep in Redis), stops
it, and starts the next. Then prints goodput per deployment and the ratio disaggregated / colocated
(the better colocated variant, as the paper does), and draws every deployment on the same axes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, model_validator
from rich.console import Console
from rich.table import Table

from services.bench import plots, report
from services.bench.client import ClientConfig, discover_model, make_http_client, stream_request
from services.bench.metrics import RequestRecord, interpolated_goodput, percentile
from services.bench.serve import (
    BenchResult,
    Progress_,
    add_workload_args,
    analyze,
    api_from_args,
    default_output_dir,
    print_result,
    progress_bar,
    progress_hook,
    save,
    slo_from_args,
    sweep,
    sweep_from_args,
    workload_from_args,
)
from services.launcher import Stack
from services.planner.args import profiles_for
from services.planner.deployment import PlannedDeployment
from services.planner.replay import RatePoint, load_runs, replay
from services.planner.simulator import Limits
from services.planner.specs import gpu_spec
from shared.argtypes import names_from
from shared.config import Auto, DType, EngineSettings, Settings, Weights, deep_merge, load_settings
from shared.cpus import available_cpus, pin_process, process_cpu_seconds
from shared.servers import free_port
from shared.state import Phase, connect_redis, read_request, read_steps, recent_requests
from shared.workloads import SLO, WorkloadRequest

# name -> what it runs on `cores` cores (each role's threads are set explicitly; the 3-worker ones run 1.5x
# the cores' threads, which the OS time-shares).
DEPLOYMENTS: dict[str, str] = {
    "disagg": "1 prefill + 1 decode worker, half the cores each",
    "disagg-2p1d": "2 prefill + 1 decode workers, half the cores' threads each: 3 on 2, the OS shares the cores",
    "colocated": "1 colocated worker (prefill-first continuous batching) on all the cores",
    "colocated-2x1": "2 colocated workers, half the cores each",
    "colocated-3x1": "3 colocated workers, half the cores' threads each: 3 on 2, as disagg-2p1d",
    "chunked": "1 colocated worker with chunked prefill (Sarathi-Serve) on all the cores",
    "plan": "the disaggregated deployment of --plan (emulated GPUs for a reference or roofline plan)",
    "plan-baseline": "the colocated baseline of --plan, on as many GPUs",
}
PLANNED = ("plan", "plan-baseline")
STEP_FLUSH_S = 1.5  # a little more than the workers' interval between step-record writes
COLOCATED = ("colocated", "colocated-2x1", "colocated-3x1")  # the baselines of the ratio: the best one counts
DISAGGREGATED = ("disagg", "disagg-2p1d")  # the better one counts
# What the planner assumes of every instance (the simulator's Limits); a plan's deployments run with them.
PLAN_LIMITS = Limits()

log = logging.getLogger("distserve.bench.compare")


class EngineKnobs(BaseModel):
    """What the deployments of one comparison share: the cores they split, the model, every worker's engine
    knobs, and the options of the disaggregated ones. Each deployment's `Settings` derive from these, and
    validate them (`deployment_settings`): only what the comparison itself means is checked here."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cores: int = 2  # split evenly between two workers
    model: str = "default"
    kv_cache_gib: float = EngineSettings.model_fields["kv_cache_memory_gib"].default
    max_num_seqs: int = EngineSettings.model_fields["max_num_seqs"].default
    weights: Weights | Auto = "auto"  # of float32 workers; bfloat16 keeps its own; auto: per CPU and role
    compile: bool = False  # decode-only steps as compiled graphs in every worker
    dtype: DType | Auto = "auto"  # every worker's; auto: per CPU and role (shared/engine/precision.py)
    prefill_dtype: DType | Auto | None = None  # disaggregated prefill workers' (None: dtype), e.g. bfloat16 on AMX CPUs
    chunk_tokens: int = 256  # chunked prefill's per-step token budget (decodes + prompt chunks)
    prefill_nice: int = 0  # disaggregated prefill workers yield the cores to decode by this much (RoleSettings.nice)
    decode_interval: float = 0.0  # disaggregated decode workers pace their steps (RoleSettings.step_interval_s)
    pin: bool = False  # workers on CPUs of their own; the services (and this client) on the last worker's

    @model_validator(mode="after")
    def _cores(self) -> EngineKnobs:
        if self.cores < 2 or self.cores % 2:
            raise ValueError(f"--cores must be even and >= 2 (split evenly between two workers), got {self.cores}")
        if self.pin and self.cores > len(available_cpus()):
            raise ValueError(f"--pin with --cores {self.cores} needs that many CPUs; {len(available_cpus())} available")
        return self

    def service_cpus(self) -> list[int]:
        """Where the gateway, NATS, Redis and the load generator run when pinned: the last worker's CPU."""
        return [available_cpus()[self.cores - 1]]


parse_deployments = names_from(DEPLOYMENTS, "deployment")


def deployment_overrides(name: str, knobs: EngineKnobs) -> dict[str, Any]:
    """The settings overrides (load_settings' nested dict) that make deployment ``name``."""
    pinning = {"pin_workers": True, "service_cpus": knobs.service_cpus()} if knobs.pin else {}
    return {**worker_overrides(name, knobs), **pinning}


def worker_overrides(name: str, knobs: EngineKnobs) -> dict[str, Any]:
    """The workers of deployment ``name``: how many, in which role, with which engine settings."""
    half, whole = knobs.cores // 2, knobs.cores

    def engine_in(dtype: str) -> dict[str, Any]:
        return {"kv_cache_memory_gib": knobs.kv_cache_gib, "max_num_seqs": knobs.max_num_seqs, "compile": knobs.compile,
                "dtype": dtype, "weights": knobs.weights if dtype != "bfloat16" else "native"}

    engine = engine_in(knobs.dtype)
    if name in DISAGGREGATED:
        return {"mode": "disaggregated", "prefill_instances": 2 if name == "disagg-2p1d" else 1, "decode_instances": 1,
                "prefill": {**engine_in(knobs.prefill_dtype or knobs.dtype), "num_threads": half,
                            "nice": knobs.prefill_nice},
                "decode": {**engine, "num_threads": half, "step_interval_s": knobs.decode_interval}}
    if name == "colocated":
        return {"mode": "colocated", "colocated_instances": 1, "colocated": {**engine, "num_threads": whole}}
    if name in ("colocated-2x1", "colocated-3x1"):
        instances = 2 if name == "colocated-2x1" else 3
        return {"mode": "colocated", "colocated_instances": instances, "colocated": {**engine, "num_threads": half}}
    if name == "chunked":
        return {"mode": "colocated", "colocated_instances": 1,
                "colocated": {**engine, "num_threads": whole, "chunked_prefill": True,
                              "max_num_batched_tokens": knobs.chunk_tokens}}
    raise ValueError(f"unknown deployment {name!r}; choose from {', '.join(DEPLOYMENTS)}")


def deployment_settings(name: str, knobs: EngineKnobs, port: int, slo: SLO,
                        plan: PlannedDeployment | None = None) -> Settings:
    """Settings for a fresh stack: its own servers (no URLs), gateway on ``port``, SLO metrics as benched."""
    common = {"nats_url": None, "redis_url": None,
              "gateway": {"port": port, "slo_ttft_s": slo.ttft_s, "slo_tpot_s": slo.tpot_s}}
    if name in PLANNED:
        if plan is None:
            raise ValueError(f"deployment {name} needs --plan")
        limits = {"max_num_seqs": PLAN_LIMITS.max_batch, "max_num_batched_tokens": PLAN_LIMITS.prefill_token_budget}
        overrides = plan.overrides(baseline=name == "plan-baseline", same_gpus=True)
        return load_settings(deep_merge(overrides, {**common, "prefill": limits, "decode": limits,
                                                    "colocated": limits}))
    return load_settings({**deployment_overrides(name, knobs), "model": knobs.model, **common})


# ---- where the time goes ---------------------------------------------------------------------------

# (label, from phase, to phase): spans of a request's timeline, in seconds.
SPANS: tuple[tuple[str, Phase, Phase], ...] = (
    ("queue", "arrived", "prefill_start"),  # dispatch + waiting in the prefill queue
    ("prefill", "prefill_start", "prefill_end"),  # the step that computed the prompt's last token
    ("to_decode", "prefill_end", "decode_start"),  # KV hand-off and waiting for decode room
    ("kv_transfer", "kv_transfer_start", "kv_transfer_end"),
    ("decode", "decode_start", "finish"),
)


def split_by_run(timelines: Sequence[Mapping[str, str]], run_starts: Sequence[tuple[float, float]]
                 ) -> dict[float, list[Mapping[str, str]]]:
    """Assign each request state to the sweep run it arrived in, by wall clock.

    ``run_starts``: (rate, time.time() at the run's start) in order. Runs never overlap (each ends
    before the next starts), so a request belongs to the last run that started before it arrived;
    requests from before the first run (the warm-up) are dropped.
    """
    starts = sorted(run_starts, key=lambda rs: rs[1])
    out: dict[float, list[Mapping[str, str]]] = {rate: [] for rate, _ in starts}
    for state in timelines:
        try:
            arrived = float(state["arrived"])
        except (KeyError, ValueError):
            continue
        run = [rate for rate, at in starts if at <= arrived]
        if run:
            out[run[-1]].append(state)
    return out


def phase_breakdown(timelines: Sequence[Mapping[str, str]]) -> dict[str, dict[str, float]]:
    """Per span: count, median and p90 seconds, over the requests that have both ends of it."""
    out: dict[str, dict[str, float]] = {}
    for label, start, end in SPANS:
        values = [float(s[end]) - float(s[start]) for s in timelines if start in s and end in s]
        if values:
            out[label] = {"n": len(values), "p50": percentile(values, 50) or 0.0, "p90": percentile(values, 90) or 0.0}
    return out


async def fetch_steps(redis_url: str, since: float) -> dict[str, list[dict[str, Any]]]:
    """The engine steps each worker recorded (shared.state.read_steps) that ended after ``since``."""
    await asyncio.sleep(STEP_FLUSH_S)  # workers push their records every second
    client = connect_redis(redis_url)
    try:
        return {name: [r for r in records if r["ended"] >= since]
                for name, records in (await read_steps(client)).items()}
    finally:
        await client.aclose()


async def fetch_timelines(redis_url: str, count: int) -> list[dict[str, str]]:
    """The ``count`` most recent request states of a stack (id added as 'request_id')."""
    client = connect_redis(redis_url)
    try:
        states = []
        for request_id in await recent_requests(client, count):
            state = await read_request(client, request_id)
            if state is not None:
                states.append({"request_id": request_id, **state})
        return states
    finally:
        await client.aclose()


# ---- the comparison ---------------------------------------------------------------------------------

def best_of(goodputs: Mapping[str, float | None], names: Sequence[str]) -> tuple[str, float] | None:
    """The deployment among ``names`` with the highest goodput (None if none ran or none met the target)."""
    measured = [(value, name) for name in names if (value := goodputs.get(name)) is not None]
    if not measured:
        return None
    value, name = max(measured)
    return name, value


def goodput_ratio(goodputs: Mapping[str, float | None]) -> tuple[str, str, float] | None:
    """(disaggregated name, colocated name, ratio of their goodputs): the better of each kind, when both exist."""
    disagg, base = best_of(goodputs, DISAGGREGATED), best_of(goodputs, COLOCATED)
    if disagg is None or base is None:
        return None
    return disagg[0], base[0], disagg[1] / base[1]


def common_scale_rate(results: Sequence[BenchResult], explicit: float | None) -> float:
    """The one rate at which every deployment's SLO-scale curve is drawn: ``explicit``, else the lowest
    goodput among the deployments (every one was measured there when they share the swept rates),
    else the lowest rate all of them measured."""
    if explicit is not None:
        return explicit
    shared = set.intersection(*(set(r.records) for r in results))
    goodputs = [r.goodput for r in results if r.goodput is not None and r.goodput in shared]
    if goodputs:
        return min(goodputs)
    if not shared:
        raise ValueError("the deployments share no measured rate: pass --scale-rate")
    return min(shared)


def comparison_table(results: Sequence[BenchResult], ratio: tuple[str, str, float] | None) -> Table:
    rates = sorted({s.rate for r in results for s in r.summaries})
    table = Table(title="goodput (req/s at the attainment target) and attainment per rate")
    for name in ("deployment", "goodput", "interpolated", *(f"@{rate:g}" for rate in rates)):
        table.add_column(name, justify="right")
    for r in results:
        by_rate = {s.rate: s for s in r.summaries}
        table.add_row(r.label, "-" if r.goodput is None else f"{r.goodput:g}",
                      "-" if r.goodput_interpolated is None else f"{r.goodput_interpolated:.3g}",
                      *(f"{100 * by_rate[rate].attainment:.0f}%" if rate in by_rate else "" for rate in rates))
    if ratio is not None:
        table.caption = f"{ratio[0]} / {ratio[1]} goodput: {ratio[2]:.2f}x"
    return table


def plot_all(results: Sequence[BenchResult], slo: SLO, scale_rate: float, out: Path) -> None:
    plots.plot_attainment_vs_rate({r.label: r.summaries for r in results}, slo, out / "attainment_vs_rate.png")
    scaled = [r for r in results if scale_rate in r.records]
    plots.plot_attainment_vs_scale(
        {r.label: (r.scales, analyze(r.label, r.records, slo, scale_rate=scale_rate).scale_attainment)
         for r in scaled}, slo, out / "attainment_vs_slo_scale.png",
        title=f"attainment vs SLO scale at {scale_rate:g} req/s")
    plots.plot_latency_cdfs({r.label: r.records[scale_rate] for r in scaled}, slo, out / "latency_cdf.png",
                            title=f"latency CDFs at {scale_rate:g} req/s")


# ---- running one deployment ---------------------------------------------------------------------------

@dataclass
class Measured:
    records: dict[float, list[RequestRecord]]
    timelines: dict[float, list[Mapping[str, str]]]
    steps: dict[str, list[dict[str, Any]]]  # each worker's engine steps during the sweep, by role:instance
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # each process's CPU time during the sweep
    sweep_seconds: float = 0.0


def stack_processes(stack: Stack) -> dict[str, int]:
    """Every process of a stack by name (servers, gateway, workers) and this load generator."""
    pids = {c.name: c.proc.pid for c in stack.children}
    pids |= {s.name: s.pid for s in stack.servers if s.pid is not None}
    return {**pids, "load generator": os.getpid()}


def run_deployment(name: str, settings: Settings, args: argparse.Namespace, requests: Sequence[WorkloadRequest],
                   slo: SLO, progress: Progress_ | None, say: Callable[[str], None]) -> Measured:
    """Start a fresh stack, warm it up, sweep it, read its request timelines, stop it."""
    stack = Stack(settings, args.log_level, announce=False)
    own_cpus = available_cpus()
    try:
        t0 = time.monotonic()
        stack.start()
        if settings.service_cpus is not None:  # the load generator would preempt a worker as the services do
            pin_process(os.getpid(), settings.service_cpus)
        stack.wait_ready(args.ready_timeout)
        say(f"{name}: ready in {time.monotonic() - t0:.0f} s at {stack.url}")
        model = asyncio.run(discover_model(stack.url))
        client = ClientConfig(base_url=stack.url, model=model, api=api_from_args(args), ignore_eos=args.ignore_eos,
                              extra_body=args.extra_body, request_timeout_s=args.request_timeout)
        asyncio.run(warm_up(client, args.warmup))
        run_starts: list[tuple[float, float]] = []

        def mark(rate: float, total: int) -> Callable[[], None]:
            run_starts.append((rate, time.time()))  # Redis timestamps are time.time()
            return progress(rate, total) if progress else (lambda: None)

        pids = stack_processes(stack)
        cpu_before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        swept = time.monotonic()
        records = asyncio.run(sweep(client, requests, sweep_from_args(args), slo, mark, say))
        swept = time.monotonic() - swept
        cpu = {name: process_cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        total = sum(len(rs) for rs in records.values()) + args.warmup
        assert stack.settings.redis_url is not None  # the stack started its own
        timelines = asyncio.run(fetch_timelines(stack.settings.redis_url, total))
        steps = asyncio.run(fetch_steps(stack.settings.redis_url, run_starts[0][1] if run_starts else 0.0))
        return Measured(records, split_by_run(timelines, run_starts), steps, cpu, swept)
    finally:
        stack.stop()
        pin_process(os.getpid(), own_cpus)


async def warm_up(client: ClientConfig, n: int) -> None:
    """A few short requests one at a time, unrecorded: first steps allocate and warm caches."""
    async with make_http_client(client) as http:
        for i in range(n):
            timing = await stream_request(http, client, f"Warm-up request {i}: say hello.", 8)
            if timing.error:
                raise RuntimeError(f"warm-up request failed: {timing.error}")


def cap_outputs(requests: Sequence[WorkloadRequest], cap: int | None) -> list[WorkloadRequest]:
    """Clamp output lengths to ``cap`` so a sweep fits in time, without changing which requests run."""
    if cap is None:
        return list(requests)
    if cap < 1:
        raise ValueError(f"--output-cap must be >= 1, got {cap}")
    return [replace(r, output_tokens=min(r.output_tokens, cap)) for r in requests]


# ---- command line ------------------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="goodput of disaggregated vs colocated deployments on the same cores",
                              description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--deployments", type=parse_deployments, default=None,
                   help=f"comma-separated, run in this order: {', '.join(DEPLOYMENTS)} (default: every one but "
                   "the plan's; with --plan: plan,plan-baseline)")
    p.add_argument("--plan", type=Path, help="a plan from `distserve plan --yaml`: deployments `plan` and "
                   "`plan-baseline` run it (emulated GPUs for reference or roofline plans), goodput per GPU, next "
                   "to the simulator's prediction for the same deployment and the same requests")
    # Each knob's default is EngineKnobs' (given only when set: knob=None is left out).
    knob = functools.partial(_knob_flag, p)
    knob("--cores", "cores", int, "cores the deployments split (default 2)")
    knob("--chunk-tokens", "chunk_tokens", int, "token budget per step of `chunked` (default 256)")
    knob("--kv-cache-gib", "kv_cache_gib", float, "KV pool per worker (default 1.0)")
    knob("--max-num-seqs", "max_num_seqs", int, "decode batch cap per worker (default 64)")
    knob("--model", "model", str, "served model (default: SmolLM2-135M)")
    knob("--weights", "weights", str, f"linear weights of every float32 worker: auto (per CPU and role, the "
         f"default), {', '.join(get_args(Weights))}")
    knob("--compile", "compile", None, "every worker runs decode-only steps as compiled graphs (compiles at start)")
    knob("--dtype", "dtype", str, "every worker's dtype: auto (per CPU and role, the default), float32 or bfloat16 "
         "(keeps bfloat16 weights)")
    knob("--prefill-dtype", "prefill_dtype", str,
         "disaggregated prefill workers' dtype (default: --dtype); their KV is converted on import")
    knob("--prefill-nice", "prefill_nice", int, "disaggregated deployments' prefill workers run N nice levels below "
         "decode (0-19), so that on shared cores decode steps run first (default 0)")
    knob("--decode-interval", "decode_interval", float, "disaggregated deployments' decode worker starts a step at "
         "most every S seconds, leaving the rest to prefill on shared cores (default 0: as fast as it can)")
    knob("--pin", "pin", None, "pin each worker to its own CPUs, and the gateway, NATS, Redis and this load "
         "generator to the last worker's (Settings.pin_workers, service_cpus)")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded requests before each sweep (default 2)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for each stack")
    p.add_argument("--log-level", default="WARNING", help="log level of the stacks' processes")
    p.add_argument("--output-cap", type=int, help="clamp every output length to this many tokens, keeping "
                   "every request (--max-output-tokens skips longer ones instead)")
    add_workload_args(p)
    p.set_defaults(func=main)


def _knob_flag(parser: argparse.ArgumentParser, flag: str, knob: str, kind: type | None, help_text: str) -> None:
    if kind is None:
        parser.add_argument(flag, dest=f"knob:{knob}", action="store_true", default=None, help=help_text)
    else:
        parser.add_argument(flag, dest=f"knob:{knob}", type=kind, default=None, help=help_text)


def knobs_from_args(args: argparse.Namespace) -> EngineKnobs:
    given = {dest[5:]: value for dest, value in vars(args).items() if dest.startswith("knob:") and value is not None}
    return EngineKnobs(**given)


def main(args: argparse.Namespace) -> int:
    console, err = Console(), Console(stderr=True)
    try:
        slo = slo_from_args(args)
        sweep_from_args(args)  # validates the sweep before any stack starts
        knobs = knobs_from_args(args)
        plan = PlannedDeployment.load(args.plan) if args.plan else None
        if args.deployments is None:
            args.deployments = PLANNED if plan else tuple(d for d in DEPLOYMENTS if d not in PLANNED)
        # Every deployment's settings, validated before the first stack starts (ports are set per run).
        for name in args.deployments:
            deployment_settings(name, knobs, 0, slo, plan)
        requests = cap_outputs(workload_from_args(args), args.output_cap)
    except (ValueError, FileNotFoundError) as e:
        err.print(f"[red]error:[/red] {e}")
        return 2

    signal.signal(signal.SIGTERM, _interrupt)  # a stopped comparison still stops its stack

    out: Path = args.output_dir or default_output_dir("compare", args.workload)
    load_before = os.getloadavg()  # other work on the machine skews every number: record it
    results: list[BenchResult] = []
    failed: list[str] = []
    for name in args.deployments:
        settings = deployment_settings(name, knobs, free_port(), slo, plan)
        with progress_bar(err) if args.progress else contextlib.nullcontext() as bar:
            try:
                measured = run_deployment(name, settings, args, requests, slo, progress_hook(bar, name), err.log)
            except RuntimeError as e:
                err.print(f"[red]{name} failed:[/red] {e}")
                failed.append(name)
                continue
        result = analyze(name, measured.records, slo)
        breakdown = {rate: phase_breakdown(states) for rate, states in measured.timelines.items()}
        meta = {"command": "compare", "deployment": name, "description": DEPLOYMENTS[name],
                "settings": json.loads(settings.model_dump_json()), "workload": args.workload,
                "sweep": asdict(sweep_from_args(args)), "phases": breakdown,
                "cpu_seconds": measured.cpu_seconds, "sweep_seconds": measured.sweep_seconds}
        if plan is not None and name in PLANNED:
            meta["gpus"] = plan.simulated(name == "plan-baseline", same_gpus=True).gpus
            meta["plan"] = plan.describe(name == "plan-baseline", same_gpus=True)
        save(result, out / name, meta, with_plots=False)
        (out / name / "timelines.json").write_text(json.dumps(measured.timelines, indent=1) + "\n")
        (out / name / "steps.json").write_text(json.dumps(measured.steps) + "\n")
        print_result(result, console)
        console.print(phase_table(name, breakdown))
        results.append(result)
    if not results:
        return 1
    goodputs = {r.label: r.goodput for r in results}
    ratio = goodput_ratio(goodputs)
    console.print(comparison_table(results, ratio))
    planned = None
    if plan is not None and any(r.label in PLANNED for r in results):
        planned = against_simulator(plan, [r for r in results if r.label in PLANNED], out, slo)
        console.print(planned_table(planned, slo))
    scale_rate = None
    with contextlib.suppress(ValueError):
        scale_rate = common_scale_rate(results, args.scale_rate)
    if args.plots and scale_rate is not None:
        plot_all(results, slo, scale_rate, out)
    report.write_summary({
        "command": "compare", "workload": args.workload, "slo": asdict(slo), "cores": knobs.cores,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "goodput_rps": goodputs,
        "goodput_interpolated_rps": {r.label: r.goodput_interpolated for r in results},
        "ratio": None if ratio is None else {"disaggregated": ratio[0], "baseline": ratio[1],
                                             "disagg_over_baseline": ratio[2]},
        "failed": failed, "scale_rate": scale_rate,
        "plan": None if planned is None else [asdict(p) for p in planned],
    }, out)
    console.print(f"results: {out}/ (one folder per deployment; summary.json and plots here)")
    return 1 if failed else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# ---- a plan through the stack, next to the simulator ----------------------------------------------------

@dataclass(frozen=True)
class PlannedResult:
    """One of a plan's deployments as served by the stack and as the simulator predicts it, on the same requests."""

    deployment: str
    gpus: int
    goodput: float | None  # measured through the stack, req/s: where attainment crosses the target
    simulated_goodput: float | None  # (interpolated between the swept rates, as `interpolated_goodput`)
    points: list[RatePoint]  # per rate: attainment and p50 latencies, measured and simulated

    def per_gpu(self, value: float | None) -> float | None:
        return None if value is None else value / self.gpus


def against_simulator(plan: PlannedDeployment, results: Sequence[BenchResult], out: Path,
                      slo: SLO) -> list[PlannedResult]:
    """Replay each deployment's requests (their send times and lengths) through the simulator."""
    disaggregated, colocated = profiles_for(plan.model, gpu_spec(plan.hardware).name,
                                            "reference" if plan.profile.startswith("reference") else plan.profile)
    planned = []
    for result in results:
        baseline = result.label == "plan-baseline"
        deployment = plan.simulated(baseline, same_gpus=True)
        points = replay(load_runs(out / result.label / "requests.json"), deployment,
                        colocated if baseline else disaggregated, slo, PLAN_LIMITS)
        simulated = interpolated_goodput([(p.rate, p.predicted) for p in points], slo.attainment_target)
        planned.append(PlannedResult(result.label, deployment.gpus, result.goodput_interpolated, simulated, points))
    return planned


def planned_table(planned: Sequence[PlannedResult], slo: SLO) -> Table:
    table = Table(title=f"through the stack vs simulated (same requests): SLO attainment (TTFT {slo.ttft_s:g} s, "
                        f"TPOT {slo.tpot_s:g} s) and goodput per GPU")
    for column in ("deployment", "GPUs", "rate", "stack", "simulated", "error (pp)", "TTFT p50 ms stack / sim",
                   "TPOT p50 ms stack / sim"):
        table.add_column(column, justify="right")
    for p in planned:
        for point in p.points:
            table.add_row(p.deployment, str(p.gpus), f"{point.rate:g}", f"{point.measured:.1%}",
                          f"{point.predicted:.1%}", f"{point.error_pp:+.1f}",
                          f"{point.measured_ttft * 1e3:.0f} / {point.predicted_ttft * 1e3:.0f}",
                          f"{point.measured_tpot * 1e3:.0f} / {point.predicted_tpot * 1e3:.0f}")
    lines = []
    for p in planned:
        stack, sim = p.per_gpu(p.goodput), p.per_gpu(p.simulated_goodput)
        lines.append(f"{p.deployment} on {p.gpus} GPUs: goodput per GPU {'-' if stack is None else f'{stack:.3g}'} "
                     f"through the stack, {'-' if sim is None else f'{sim:.3g}'} simulated (req/s per GPU where "
                     "attainment crosses the target, between swept rates)")
    by_name = {p.deployment: p for p in planned}
    if {"plan", "plan-baseline"} <= set(by_name):
        ours, base = by_name["plan"], by_name["plan-baseline"]
        for label, a, b in (("stack", ours.per_gpu(ours.goodput), base.per_gpu(base.goodput)),
                            ("simulated", ours.per_gpu(ours.simulated_goodput), base.per_gpu(base.simulated_goodput))):
            if a is not None and b:
                lines.append(f"plan / baseline per GPU, {label}: {a / b:.2f}x")
    table.caption = "\n".join(lines)
    return table


def phase_table(name: str, breakdown: Mapping[float, Mapping[str, Mapping[str, float]]]) -> Table:
    table = Table(title=f"{name}: where the time goes, p50/p90 seconds (from the Redis timelines)")
    table.add_column("rate", justify="right")
    for label, _, _ in SPANS:
        table.add_column(label, justify="right")
    for rate in sorted(breakdown):
        spans = breakdown[rate]
        table.add_row(f"{rate:g}", *(f"{spans[label]['p50']:.2f}/{spans[label]['p90']:.2f}" if label in spans else "-"
                                     for label, _, _ in SPANS))
    return table

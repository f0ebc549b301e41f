"""`distserve bench serve`: SLO attainment and goodput of any OpenAI-compatible endpoint.

One run per swept rate, each the same seeded workload and arrival pattern (sped up or slowed
down), then optionally a goodput search that bisects between the highest passing and the lowest
failing rate. Writes per-request JSON/CSV, summary.json, a table and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.bench import plots, report
from services.bench.arrivals import ARRIVAL_PROCESSES, ArrivalProcess, arrival_times
from services.bench.client import APIS, Api, ClientConfig, discover_model, make_http_client
from services.bench.loadgen import Run, run_load
from services.bench.metrics import (
    RequestRecord,
    RunSummary,
    attainment_vs_scale,
    goodput,
    interpolated_goodput,
    next_probe_rate,
    summarize,
)
from services.planner.workload import CONTEXT_TOKENS
from shared.argtypes import positive_float
from shared.workloads import SLO, WorkloadRequest, default_api, default_slo, load_workload

# The SLO-scale view: both bounds from 4x tighter to 4x looser (1.0 included).
DEFAULT_SCALES: tuple[float, ...] = tuple(float(s) for s in np.geomspace(0.25, 4.0, 25))


@dataclass(frozen=True)
class SweepConfig:
    rates: tuple[float, ...]
    num_requests: int = 100
    seed: int = 0
    arrival: ArrivalProcess = "poisson"
    burstiness: float = 1.0
    time_limit_s: float = 300.0  # per run
    search_steps: int = 0  # extra runs bisecting for goodput after the sweep
    cooldown_s: float = 1.0  # pause between runs so one run's stragglers do not skew the next

    def __post_init__(self) -> None:
        if not self.rates or any(not r > 0 for r in self.rates):
            raise ValueError(f"rates must be positive (inf allowed), got {self.rates}")
        if self.num_requests < 1 or self.search_steps < 0 or self.cooldown_s < 0 or not self.time_limit_s > 0:
            raise ValueError("need num_requests >= 1, search_steps >= 0, cooldown >= 0, time_limit > 0")
        arrival_times(1, 1.0, process=self.arrival, burstiness=self.burstiness)  # validates both


@dataclass
class BenchResult:
    """Everything one deployment's sweep measured, plus its goodput and SLO-scale view."""

    label: str
    slo: SLO
    records: dict[float, list[RequestRecord]]  # per rate
    summaries: list[RunSummary] = field(default_factory=list)
    goodput: float | None = None
    goodput_interpolated: float | None = None
    scale_rate: float | None = None
    scales: Sequence[float] = DEFAULT_SCALES
    scale_attainment: list[float] = field(default_factory=list)

    def points(self) -> list[tuple[float, float]]:
        return [(s.rate, s.attainment) for s in self.summaries]


Progress_ = Callable[[float, int], Callable[[], None]]  # (rate, total) -> advance-by-one


async def sweep(client: ClientConfig, requests: Sequence[WorkloadRequest], config: SweepConfig, slo: SLO,
                progress: Progress_ | None = None, log: Callable[[str], None] = lambda _: None,
                ) -> dict[float, list[RequestRecord]]:
    """Run every rate of the sweep, then the goodput search steps; records per rate."""
    results: dict[float, list[RequestRecord]] = {}
    async with make_http_client(client) as http:

        async def measure(rate: float) -> None:
            arrivals = arrival_times(len(requests), rate, seed=config.seed, process=config.arrival,
                                     burstiness=config.burstiness)
            advance = progress(rate, len(requests)) if progress else None
            run = Run(rate=rate, requests=requests, arrivals=arrivals, time_limit_s=config.time_limit_s)
            records = await run_load(http, client, run, on_done=(lambda i, r: advance()) if advance else None)
            results[rate] = records
            s = summarize(records, slo)
            log(f"rate {rate:g}: attainment {100 * s.attainment:.1f}%, {s.errors} errors")
            await asyncio.sleep(config.cooldown_s)

        for rate in config.rates:
            await measure(rate)
        for _ in range(config.search_steps):
            points = [(rate, summarize(rs, slo).attainment) for rate, rs in results.items()]
            rate = next_probe_rate(points, slo.attainment_target)
            if rate in results:
                break  # converged onto a measured point
            await measure(rate)
    return results


def analyze(label: str, records: dict[float, list[RequestRecord]], slo: SLO, *,
            scale_rate: float | None = None, scales: Sequence[float] = DEFAULT_SCALES) -> BenchResult:
    """Summaries, goodput and the attainment-vs-SLO-scale curve at ``scale_rate``.

    ``scale_rate`` defaults to the goodput rate (the most loaded passing rate), else the lowest rate.
    """
    summaries = sorted((summarize(rs, slo) for rs in records.values()), key=lambda s: s.rate)
    result = BenchResult(label=label, slo=slo, records=records, summaries=summaries, scales=scales)
    result.goodput = goodput(result.points(), slo.attainment_target)
    result.goodput_interpolated = interpolated_goodput(result.points(), slo.attainment_target)
    if scale_rate is None:
        scale_rate = result.goodput if result.goodput is not None else summaries[0].rate
    if scale_rate not in records:
        raise ValueError(f"--scale-rate {scale_rate:g} was not measured (rates: {sorted(records)})")
    result.scale_rate = scale_rate
    result.scale_attainment = attainment_vs_scale(records[scale_rate], slo, scales)
    return result


def save(result: BenchResult, directory: Path, meta: dict[str, Any], with_plots: bool = True) -> None:
    all_records = [r for rate in sorted(result.records) for r in result.records[rate]]
    report.write_records(all_records, directory)
    report.write_summary({
        **meta,
        "label": result.label,
        "slo": asdict(result.slo),
        "goodput_rps": result.goodput,
        "goodput_interpolated_rps": result.goodput_interpolated,
        "runs": [asdict(s) for s in result.summaries],
        "slo_scale_view": {"rate": result.scale_rate, "scales": list(result.scales),
                           "attainment": result.scale_attainment},
    }, directory)
    if with_plots:
        plots.plot_attainment_vs_rate({result.label: result.summaries}, result.slo,
                                      directory / "attainment_vs_rate.png")
        plots.plot_attainment_vs_scale({f"{result.label} @ {result.scale_rate:g} req/s":
                                        (result.scales, result.scale_attainment)},
                                       result.slo, directory / "attainment_vs_slo_scale.png")
        by_rate = {f"{result.label} @ {rate:g} req/s": rs for rate, rs in sorted(result.records.items())}
        plots.plot_latency_cdfs(by_rate, result.slo, directory / "latency_cdf.png")


# ---- command line ----------------------------------------------------------------------------------

def parse_rates(text: str) -> tuple[float, ...]:
    """'1,2,4' or '0.5' or 'inf' -> rates in req/s."""
    try:
        rates = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad rate list {text!r}: expected e.g. 0.5,1,2 or inf") from None
    if any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive, got {text!r}")
    return rates



def add_workload_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared with `bench compare`: workload, load shape, SLOs, outputs."""
    p.add_argument("--workload", default="chatbot",
                   help="chatbot | code | summarization | synthetic:<in>:<out> (N or LO-HI each side)")
    p.add_argument("--num-requests", "-n", type=int, default=100, help="requests per rate (default 100)")
    p.add_argument("--rate", type=parse_rates, default=(1.0,),
                   help="req/s, or a sweep: 0.5,1,2,4 (inf: all at once)")
    p.add_argument("--arrival", choices=ARRIVAL_PROCESSES, default="poisson")
    p.add_argument("--burstiness", type=positive_float, default=1.0, help="gamma shape for --arrival gamma")
    p.add_argument("--seed", type=int, default=0, help="seeds the workload sample and the arrivals")
    p.add_argument("--time-limit", type=positive_float, default=300.0, help="seconds per rate (default 300)")
    p.add_argument("--search", type=int, default=0, metavar="STEPS", help="extra runs bisecting for goodput")
    p.add_argument("--cooldown", type=float, default=1.0, help="seconds between runs")
    p.add_argument("--ttft", type=positive_float, help="TTFT SLO in seconds (default: the workload's)")
    p.add_argument("--tpot", type=positive_float, help="TPOT SLO in seconds (default: the workload's)")
    p.add_argument("--target", type=float, help="attainment target in (0, 1] (default: the workload's)")
    p.add_argument("--scale-rate", type=float, help="rate for the SLO-scale plot (default: the goodput rate)")
    p.add_argument("--tokenizer", default="default", help="counts workload tokens: 'default' (SmolLM2), "
                   "a .gguf file or a Hugging Face model directory")
    p.add_argument("--max-input-tokens", type=int)
    p.add_argument("--max-output-tokens", type=int)
    p.add_argument("--max-total-tokens", type=int, default=8192, help="skip longer requests (default 8192)")
    p.add_argument("--api", choices=APIS, default=None,
                   help="/v1/completions or /v1/chat/completions (default: chat for chatbot, completions otherwise)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (for servers that reject unknown fields)")
    p.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    p.add_argument("--request-timeout", type=positive_float, default=600.0)
    p.add_argument("--output-dir", type=Path, help="default: runs/bench/<command>-<workload>-<time>")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="open-loop load against an OpenAI-compatible endpoint: "
                              "latency, SLO attainment, goodput",
                              description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default %(default)s)")
    p.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", help="sent as a Bearer token, for servers that want one")
    p.add_argument("--label", help="name in plots and tables (default: the URL)")
    add_workload_args(p)
    p.set_defaults(func=main)


def slo_from_args(args: argparse.Namespace) -> SLO:
    base = default_slo(args.workload)
    return SLO(ttft_s=args.ttft or base.ttft_s, tpot_s=args.tpot or base.tpot_s,
               attainment_target=base.attainment_target if args.target is None else args.target)


def sweep_from_args(args: argparse.Namespace) -> SweepConfig:
    return SweepConfig(rates=args.rate, num_requests=args.num_requests, seed=args.seed, arrival=args.arrival,
                       burstiness=args.burstiness, time_limit_s=args.time_limit, search_steps=args.search,
                       cooldown_s=args.cooldown)


def api_from_args(args: argparse.Namespace) -> Api:
    api: Api = args.api or default_api(args.workload)
    return api


def workload_from_args(args: argparse.Namespace) -> list[WorkloadRequest]:
    if args.workload == "sharegpt":
        return trace_workload(args.num_requests, args.seed, min(args.max_total_tokens, CONTEXT_TOKENS))
    from shared.tokenizer import load_tokenizer  # slow import: only when a command runs

    tokenizer = load_tokenizer(args.tokenizer)
    return load_workload(args.workload, args.num_requests, args.seed,
                         count_tokens=lambda text: len(tokenizer.encode(text)),
                         max_input_tokens=args.max_input_tokens, max_output_tokens=args.max_output_tokens,
                         max_total_tokens=args.max_total_tokens)


def trace_workload(num_requests: int, seed: int, max_total_tokens: int) -> list[WorkloadRequest]:
    """`sharegpt`: the paper's chatbot workload as the planner builds it (multi-turn ShareGPT, OPT token
    counts: services/planner/workload.py), sent as token-id prompts of exactly those lengths, so that the
    stack serves the requests the simulator simulates. For the emulated engine: the ids mean nothing."""
    from services.planner.workload import load_lengths

    lengths = load_lengths("sharegpt", max_total_tokens=max_total_tokens, tokenizer="opt")
    rng = random.Random(seed)
    picks = [rng.randrange(len(lengths.inputs)) for _ in range(num_requests)]
    return [WorkloadRequest([100 + (i * 7919 + k) % 10_000 for k in range(int(lengths.inputs[i]))],
                            int(lengths.inputs[i]), int(lengths.outputs[i])) for i in picks]


def default_output_dir(command: str, workload: str) -> Path:
    return Path("runs/bench") / f"{command}-{workload.replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def progress_hook(bar: Progress | None, label: str) -> Progress_ | None:
    if bar is None:
        return None

    def start(rate: float, total: int) -> Callable[[], None]:
        task = bar.add_task(f"{label} @ {rate:g} req/s", total=total)
        return lambda: bar.advance(task)

    return start


def main(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        slo = slo_from_args(args)
        config = sweep_from_args(args)
        requests = workload_from_args(args)
        model = args.model or asyncio.run(discover_model(args.url, args.api_key))
        client = ClientConfig(base_url=args.url, model=model, api=api_from_args(args), ignore_eos=args.ignore_eos,
                              extra_body=args.extra_body, request_timeout_s=args.request_timeout,
                              api_key=args.api_key)
    except (ValueError, ConnectionError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    label = args.label or args.url
    out = args.output_dir or default_output_dir("serve", args.workload)
    with progress_bar(console) if args.progress else contextlib.nullcontext() as bar:
        records = asyncio.run(sweep(client, requests, config, slo, progress_hook(bar, label), console.log))
    try:
        result = analyze(label, records, slo, scale_rate=args.scale_rate)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    meta = {"command": "serve", "url": args.url, "model": model, "api": client.api, "workload": args.workload,
            "sweep": asdict(config)}
    save(result, out, meta, with_plots=args.plots)
    print_result(result, Console(), out)
    return 0


def print_result(result: BenchResult, console: Console, out: Path | None = None) -> None:
    slo = result.slo
    title = (f"{result.label}: SLO TTFT {slo.ttft_s:g}s, TPOT {slo.tpot_s:g}s, "
             f"target {100 * slo.attainment_target:g}%")
    console.print(report.summary_table(result.summaries, title))
    if result.goodput is None:
        console.print("goodput: no swept rate met the attainment target (try lower rates)")
    else:
        console.print(f"goodput: {result.goodput:g} req/s (highest swept rate meeting the target); "
                      f"interpolated crossing {result.goodput_interpolated:.3g} req/s")
    if out is not None:
        console.print(f"results: {out}/ (requests.json, requests.csv, summary.json, *.png)")

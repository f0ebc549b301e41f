"""`distserve plan`, `distserve profile` and `distserve simulate`: the planner's offline commands."""

from __future__ import annotations

import argparse
import sys
from typing import Any, get_args

from services.planner.args import (
    REFERENCE_NOTE,
    add_decode_overhead_arg,
    add_problem_args,
    cluster_from,
    parallel_arg,
    resolve_profiles,
)
from services.planner.latency import load_profiles, save_profiles
from services.planner.simulator import Limits, Parallel
from services.planner.specs import model_key
from services.planner.workload import Lengths, load_lengths, make_trace, synthetic_lengths
from shared.argtypes import positive_float, positive_int, positive_ints
from shared.config import DType, EngineSettings, Weights
from shared.workloads import SLO


def register(subparsers: Any) -> None:
    plan = subparsers.add_parser("plan", help="search prefill/decode placements for a model, cluster and SLO")
    add_problem_args(plan)
    plan.add_argument("--workload", default="sharegpt",
                      help="sharegpt (paper's chatbot), chatbot, code, summarization, or fixed:IN:OUT")
    plan.add_argument("--rate", type=positive_float, required=True, help="target requests/s")
    plan.add_argument("--tokenizer", default="auto",
                      help="counts the workload's tokens: opt (OPT's), default (SmolLM2's), a .gguf file or a model "
                           "directory; auto (default): opt for OPT models, else SmolLM2's")
    plan.add_argument("--cv", type=positive_float, default=1.0, help="arrival burstiness (1: Poisson)")
    plan.add_argument("--curve", help="also write attainment-vs-rate curves (plan and baseline) to this PNG")
    plan.add_argument("--baseline-tp", type=positive_int,
                      help="colocated baseline at this TP only (default: the best); the DistServe artifact ran vLLM "
                           "at TP 1 for OPT-13B and TP 4 for OPT-66B")
    plan.add_argument("--prefill", type=parallel_arg, help="hold the prefill instances to this TPxPP (with "
                      "--decode): the planner sizes that placement instead of searching, e.g. to weigh the "
                      "DistServe artifact's own placements against its choice")
    plan.add_argument("--decode", type=parallel_arg, help="hold the decode instances to this TPxPP (with --prefill)")
    out = plan.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument("--yaml", action="store_true")
    plan.set_defaults(func=_guard(run_plan))

    prof = subparsers.add_parser("profile", help="measure our engine's step times here and fit a profile")
    prof.add_argument("--model", default="default", help="engine model: default | path | 'random:{...}'")
    prof.add_argument("--name", help="model name in the profile (default: from --model)")
    prof.add_argument("--out", required=True, help="profile JSON to write")
    prof.add_argument("--prefill-lengths", type=positive_ints, default=[16, 64, 128, 256, 512])
    prof.add_argument("--prefill-batches", type=positive_ints, default=[1, 2, 4])
    prof.add_argument("--decode-batches", type=positive_ints, default=[1, 2, 4, 8, 16])
    prof.add_argument("--decode-contexts", type=positive_ints, default=[32, 128, 512])
    prof.add_argument("--decode-steps", type=positive_int, default=4)
    prof.add_argument("--repeats", type=positive_int, default=2)
    prof.add_argument("--kv-cache-gib", type=positive_float, default=1.0)
    prof.add_argument("--threads", type=positive_int, default=None)
    engine = EngineSettings()  # the serving workers' defaults
    prof.add_argument("--dtype", choices=get_args(DType), default=engine.dtype)
    prof.add_argument("--weights", choices=get_args(Weights), default=engine.weights,
                      help="linear weights, as the serving workers' <role>.weights (default %(default)s)")
    prof.add_argument("--compile", action="store_true",
                      help="decode-only steps as compiled graphs, as the workers' <role>.compile")
    prof.add_argument("--hardware", help="label for this machine (default: cpu-<arch>-<threads>t)")
    prof.add_argument("--refit", metavar="PROFILE",
                      help="instead of measuring: fit this profile's step formulas to the steps a stack served "
                           "(--steps)")
    prof.add_argument("--steps", metavar="STEPS_JSON", help="steps.json written by `bench compare` (with --refit)")
    prof.add_argument("--workers", type=lambda t: [w for w in t.split(",") if w], default=[],
                      help="with --refit: only these workers' steps, e.g. prefill-0,decode-0 (default: all)")
    prof.set_defaults(func=_guard(run_profile))

    sim = subparsers.add_parser("simulate", help="simulator vs reality: replay measured runs and compare "
                                                 "predicted with measured SLO attainment")
    sim.add_argument("--profile", required=True,
                     help="profile JSON of the machine that ran them (`distserve profile`), or reference "
                          f"(with --model: {REFERENCE_NOTE}; colocated runs use vLLM's)")
    sim.add_argument("--model", help="with --profile reference: opt-13b or opt-66b")
    runs = sim.add_mutually_exclusive_group(required=True)
    runs.add_argument("--requests", help="requests.json written by `distserve bench serve|compare`")
    runs.add_argument("--artifact-runs", nargs="+", metavar="RUN",
                      help="runs the DistServe artifact measured on A100s: its <system>-<requests>-<rate>.exp "
                           "files (simdistserve/benchmarks/alignment/data-ground-truth), or CSV copies of them")
    sim.add_argument("--deployment", choices=["disagg", "colocated"], default="disagg",
                     help="disagg: 1 prefill + 1 decode instance; colocated: --instances colocated instances")
    sim.add_argument("--instances", type=positive_int, default=1)
    sim.add_argument("--prefill", type=parallel_arg, default="1x1", help="disagg prefill instance, TPxPP")
    sim.add_argument("--decode", type=parallel_arg, default="1x1", help="disagg decode instance, TPxPP")
    sim.add_argument("--tp", type=positive_int, default=1, help="colocated instance's tensor parallelism")
    sim.add_argument("--ttft", type=positive_float, required=True, help="TTFT SLO, seconds")
    sim.add_argument("--tpot", type=positive_float, required=True, help="TPOT SLO, seconds")
    sim.add_argument("--prefill-budget", type=positive_int, default=2048, help="the workers' max_num_batched_tokens")
    sim.add_argument("--max-batch", type=positive_int, default=64, help="the workers' max_num_seqs")
    add_decode_overhead_arg(sim)
    sim.add_argument("--server-side", action="store_true",
                     help="measure TTFT/TPOT as the gateway stamped them (timelines.json beside requests.json, "
                          "from `bench compare`), not as the load generator saw them")
    sim.set_defaults(func=_guard(run_simulate), gpu="a100")


def _guard(fn: Any) -> Any:
    """Bad input (ValueError, or a file that cannot be read) becomes a one-line error and exit status 2,
    like argparse's own errors."""
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args) or 0)
        except ValueError as e:
            print(f"distserve {args.command}: error: {e}", file=sys.stderr)
        except OSError as e:
            print(f"distserve {args.command}: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    return run


def workload_tokenizer(tokenizer: str, model: str) -> str:
    if tokenizer != "auto":
        return tokenizer
    return "opt" if model_key(model).startswith("opt") else "default"


def load_workload_lengths(name: str, max_total: int, seed: int, tokenizer: str = "default") -> Lengths:
    if name.startswith("fixed:"):
        try:
            inp, out = (int(x) for x in name.removeprefix("fixed:").split(":"))
        except ValueError:
            raise ValueError(f"fixed workload is fixed:IN:OUT, got {name!r}") from None
        if inp < 1 or out < 1:
            raise ValueError(f"fixed workload lengths must be >= 1, got {name!r}")
        return synthetic_lengths(inp, out)
    return load_lengths(name, seed=seed, max_total_tokens=max_total, tokenizer=tokenizer)


def run_plan(args: argparse.Namespace) -> int:
    from services.planner.placement import PlanError, Problem, Shapes, plan_placement
    from services.planner.report import plan_json, plan_yaml, print_plan

    model, baseline = resolve_profiles(args)
    lengths = load_workload_lengths(args.workload, args.max_total_tokens, args.seed,
                                    workload_tokenizer(args.tokenizer, args.model))
    if (args.prefill is None) != (args.decode is None):
        raise ValueError("--prefill and --decode go together")
    held = None if args.prefill is None else Shapes(args.prefill, args.decode, margin=1.0)
    problem = Problem(model, cluster_from(args), SLO(args.ttft, args.tpot, args.attainment), args.rate,
                      make_trace(lengths, args.num_requests, seed=args.seed, cv=args.cv),
                      Limits(prefill_token_budget=args.prefill_budget), keep=held)
    algorithm = 1 if held else "auto" if args.algorithm == "auto" else int(args.algorithm)
    try:
        plan = plan_placement(problem, algorithm, baseline, args.baseline_tp)  # type: ignore[arg-type]
        if held and (plan.prefill.config, plan.decode.config) != (held.prefill, held.decode):
            raise PlanError(f"prefill {held.prefill} + decode {held.decode} is not a placement here (it does not "
                            "fit in memory on this cluster, or does not meet the SLO at any rate)")
    except PlanError as e:
        print(f"distserve plan: no plan: {e}", file=sys.stderr)
        return 1
    if args.curve:
        from services.planner.curves import plot_curves

        plot_curves(plan, problem, baseline, args.curve)
    if args.json:
        print(plan_json(plan))
    elif args.yaml:
        print(plan_yaml(plan), end="")
    else:
        print_plan(plan)
    return 0


def run_profile(args: argparse.Namespace) -> int:
    from services.planner.profiler import Grid, fit_report, profile_engine

    if args.refit or args.steps:
        return run_refit(args)
    from shared.engine import EngineConfig

    grid = Grid(tuple(args.prefill_lengths), tuple(args.prefill_batches), tuple(args.decode_batches),
                tuple(args.decode_contexts), args.decode_steps, args.repeats)
    name = args.name or ("random" if args.model.startswith("random:") else model_key(args.model))
    config = EngineConfig(model=args.model, kv_cache_memory_gib=args.kv_cache_gib, num_threads=args.threads,
                          dtype=args.dtype, weights=args.weights, compile=args.compile)
    model = profile_engine(config, grid, model_key(name), args.hardware, seed=0)
    for line in fit_report(model):
        print(line)
    save_profiles(args.out, [model])
    print(f"saved profile of {model.model} on {model.hardware} to {args.out} "
          f"(use: distserve plan --profile {args.out} --model {model.model} ...)")
    return 0


def run_refit(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from services.planner.profiler import fit_report, refit_to_steps

    if not (args.refit and args.steps):
        raise ValueError("--refit PROFILE and --steps STEPS_JSON go together")
    models = load_profiles(args.refit)
    if len(models) != 1:
        raise ValueError(f"{args.refit} holds {len(models)} profiles; --refit takes one machine's profile")
    try:
        steps = json.loads(Path(args.steps).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {args.steps}: {e}") from None
    model = refit_to_steps(next(iter(models.values())), steps, args.workers)
    for line in fit_report(model):
        print(line)
    save_profiles(args.out, [model])
    print(f"saved {model.model} refitted to the served steps to {args.out}")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from services.planner.replay import artifact_runs, load_runs, replay, server_runs
    from services.planner.simulator import Colocated, Deployment, Disaggregated

    slo = SLO(args.ttft, args.tpot)
    if args.deployment == "disagg":
        deployment: Deployment = Disaggregated(args.prefill, 1, args.decode, 1)
    else:
        deployment = Colocated(Parallel(args.tp), args.instances)
    if args.profile == "reference":
        if not args.model:
            raise ValueError("--profile reference needs --model (opt-13b or opt-66b)")
        ours, vllm = resolve_profiles(args)
        model = vllm if args.deployment == "colocated" else ours
    else:
        models = load_profiles(args.profile)
        if len(models) != 1:
            raise ValueError(f"{args.profile} holds {len(models)} profiles; simulate takes one machine's profile")
        (model,) = models.values()
        if args.deployment == "disagg":
            model = model.with_decode_overhead(args.decode_overhead_ms)
    if args.artifact_runs:
        if args.server_side:
            raise ValueError("--server-side needs --requests (the artifact's runs were timed by its client)")
        runs = artifact_runs([Path(path) for path in args.artifact_runs])
    else:
        requests = Path(args.requests)
        runs = server_runs(requests.parent / "timelines.json") if args.server_side else load_runs(requests)
    points = replay(runs, deployment, model, slo,
                    Limits(prefill_token_budget=args.prefill_budget, max_batch=args.max_batch))
    seen_by = "the gateway" if args.server_side else "the client"
    shape = (f"prefill {deployment.prefill}, decode {deployment.decode}" if isinstance(deployment, Disaggregated)
             else f"{deployment.num_instances} x {deployment.config}")
    table = Table(title=f"{args.deployment} ({shape}): SLO attainment measured (by {seen_by}) vs simulated with "
                        f"{model.hardware} profile (TTFT {args.ttft:g} s, TPOT {args.tpot:g} s)")
    for column in ("rate", "requests", "measured", "simulated", "error (pp)", "TTFT p50 ms measured / simulated",
                   "TPOT p50 ms measured / simulated"):
        table.add_column(column, justify="right")
    for point in points:
        table.add_row(f"{point.rate:g}", str(point.requests), f"{point.measured:.1%}", f"{point.predicted:.1%}",
                      f"{point.error_pp:+.1f}", f"{point.measured_ttft * 1e3:.0f} / {point.predicted_ttft * 1e3:.0f}",
                      f"{point.measured_tpot * 1e3:.0f} / {point.predicted_tpot * 1e3:.0f}")
    Console(width=140).print(table)
    worst = max(abs(point.error_pp) for point in points)
    print(f"largest difference: {worst:.1f} percentage points")
    return 0

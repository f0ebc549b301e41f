"""The arguments the planner's commands share (`plan`, `planner`): model, hardware, profile, SLO."""

from __future__ import annotations

import argparse

from services.planner.latency import LatencyModel, load_profiles, reference_profiles
from services.planner.simulator import Limits, Parallel
from services.planner.specs import Cluster, gpu_spec, model_key, model_shape
from shared.argtypes import fraction, non_negative_float, positive_float, positive_int

REFERENCE_NOTE = "reference profiles are A100-80GB measurements of opt-13b and opt-66b"



def parallel_arg(text: str) -> Parallel:
    """TPxPP (or TP alone), e.g. 2x1."""
    try:
        tp, _, pp = text.lower().partition("x")
        return Parallel(int(tp), int(pp or 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TPxPP with positive integers, e.g. 2x1; got {text!r}") from None


def add_problem_args(p: argparse.ArgumentParser) -> None:
    """What plan and planner share: model, hardware, profile, SLO and simulation settings."""
    p.add_argument("--model", required=True, help="opt-13b, opt-66b, llama-2-70b, ... or a profile's model name")
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--gpus-per-node", type=positive_int, default=8)
    p.add_argument("--gpu", default="a100", help="a100 | h100 | h200 (default a100)")
    p.add_argument("--profile", default="reference",
                   help=f"reference ({REFERENCE_NOTE}; the colocated baseline uses vLLM's), roofline "
                        "(analytical, any model and GPU), or a profile JSON from `distserve profile`")
    p.add_argument("--ttft", type=positive_float, required=True, help="TTFT SLO, seconds")
    p.add_argument("--tpot", type=positive_float, required=True, help="TPOT SLO, seconds")
    p.add_argument("--attainment", type=fraction, default=0.9, help="SLO attainment target (default 0.9)")
    p.add_argument("--algorithm", choices=["1", "2", "auto"], default="auto",
                   help="1: high node-affinity, 2: low node-affinity, auto: 1 if it meets the SLO end to end")
    p.add_argument("--network-gbps", type=positive_float, default=25.0, help="cross-node bandwidth (default 25)")
    p.add_argument("--num-requests", type=positive_int, default=1000, help="requests per simulation")
    p.add_argument("--max-total-tokens", type=positive_int, default=2048, help="context cap (OPT: 2048)")
    p.add_argument("--prefill-budget", type=positive_int, default=Limits().prefill_token_budget)
    p.add_argument("--seed", type=int, default=0)
    add_decode_overhead_arg(p)


def add_decode_overhead_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decode-overhead-ms", type=non_negative_float, default=0.0,
                   help="add this to every decode step of the disaggregated engine's profile: the serving loop's "
                   "own time (12 fits the DistServe artifact's A100 runs; docs/planner.md); default 0")


def resolve_profiles(args: argparse.Namespace) -> tuple[LatencyModel, LatencyModel]:
    """(disaggregated engine's profile, colocated baseline's profile) for --model/--gpu/--profile, the first
    with --decode-overhead-ms added to its decode steps."""
    ours, baseline = profiles_for(args.model, args.gpu, args.profile)
    return ours.with_decode_overhead(getattr(args, "decode_overhead_ms", 0.0)), baseline


def profiles_for(model: str, gpu_name: str, profile: str) -> tuple[LatencyModel, LatencyModel]:
    """(disaggregated engine's profile, colocated baseline's profile): `reference` (the published A100
    profiles: DistServe's and vLLM's), `roofline` (one analytical profile for both) or a profile file."""
    gpu = gpu_spec(gpu_name)
    key = model_key(model)
    if profile == "reference":
        if gpu.name != "a100":
            raise ValueError(f"{REFERENCE_NOTE}; use the roofline profile for {gpu.name}")
        ours, vllm = reference_profiles("distserve"), reference_profiles("vllm")
        if key not in ours or key not in vllm:
            raise ValueError(f"{REFERENCE_NOTE}, not {model!r}; use the roofline profile")
        return ours[key], vllm[key]
    if profile == "roofline":
        from services.planner.roofline import roofline_model

        analytical = roofline_model(model_shape(model), gpu)
        return analytical, analytical
    models = load_profiles(profile)
    if key not in models:
        raise ValueError(f"profile {profile} has no model {key!r} (it has {sorted(models)})")
    return models[key], models[key]


def cluster_from(args: argparse.Namespace) -> Cluster:
    return Cluster(args.nodes, args.gpus_per_node, nvlink_bandwidth=gpu_spec(args.gpu).nvlink_bandwidth,
                   network_bandwidth=args.network_gbps * 1e9 / 8)

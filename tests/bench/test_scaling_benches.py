"""`bench scale` and `bench autoscale` without stacks: their traces, phases and CPU accounting."""

from __future__ import annotations

import argparse
import os

import pytest
from prometheus_client import generate_latest

from services.bench.autoscale import LONG_PROMPT, gpus_in, parse_phases, prefills_moved, shifting_trace
from services.bench.scale import cpu_shares, deployment, fixed_requests
from services.gateway.metrics import GatewayMetrics
from services.gateway.registry import Registry
from shared import protocol as p
from shared.cpus import process_cpu_seconds


def test_phases_parse_and_bad_ones_are_refused() -> None:
    phases = parse_phases("2:60, 6:90:long,2:30")
    assert [(p.rate, p.seconds, p.long) for p in phases] == [(2, 60, False), (6, 90, True), (2, 30, False)]
    for bad in ("2", "2:60:short", "0:10", "x:10", "2:-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_phases(bad)


def test_the_shifting_trace_follows_its_phases() -> None:
    requests, arrivals = shifting_trace(parse_phases("2:60,6:30:long"), seed=3)
    first = [r for r, t in zip(requests, arrivals, strict=True) if t < 60]
    second = [r for r, t in zip(requests, arrivals, strict=True) if t >= 60]
    assert 80 <= len(first) <= 160 and 120 <= len(second) <= 240  # Poisson around 120 and 180
    assert all(r.input_tokens >= LONG_PROMPT for r in second) and min(r.input_tokens for r in first) < LONG_PROMPT
    assert all(len(r.prompt) == r.input_tokens and r.input_tokens + r.output_tokens <= 2048 for r in requests)
    assert arrivals == sorted(arrivals) and arrivals[-1] < 90
    assert shifting_trace(parse_phases("2:60,6:30:long"), seed=3)[1] == arrivals


def test_scale_points_split_instances_and_count_cpu_per_process() -> None:
    plan = deployment("opt-13b", 8, rate=8)
    assert (plan.prefill.instances, plan.decode.instances, plan.gpus) == (4, 4, 8)
    (request,) = fixed_requests(1, 16, 4)
    assert len(request.prompt) == 16 and request.output_tokens == 4
    shares = cpu_shares({"gateway": 2.0, "prefill-0": 1.0, "decode-3": 3.0, "nats-server": 0.5}, seconds=4.0)
    assert shares == {"gateway": 0.5, "workers": 1.0, "nats-server": 0.125}
    before = process_cpu_seconds(os.getpid())
    sum(i * i for i in range(2_000_000))
    assert process_cpu_seconds(os.getpid()) > before
    assert process_cpu_seconds(2**22 + 12345) == 0.0  # no such process


def test_gpus_in_use_are_counted_from_the_gateways_worker_info() -> None:
    registry = Registry(3.0)
    workers = (("prefill-0", "prefill", 1, 3), ("decode-0", "decode", 2, 1), ("decode-1", "decode", 2, 1))
    for name, role, tp, pp in workers:
        registry.update(p.WorkerInfo(instance_id=name, role=role, model="opt-13b", max_model_len=2048, pid=1,
                                     host="h", started_at=0, engine="emulated-a100", tp=tp, pp=pp))
    assert gpus_in(generate_latest(GatewayMetrics(registry).registry).decode()) == 3 + 2 + 2
    assert gpus_in("") == 0


def test_scale_refuses_a_model_without_a_reference_profile_before_any_stack_starts() -> None:
    from services.cli import main

    assert main(["bench", "scale", "--model", "opt-7000b"]) == 2


def test_prefills_moved_are_counted_from_the_gateways_migrations() -> None:
    metrics = GatewayMetrics(Registry(3.0))
    metrics.migrations.labels(role="prefill").inc(4)
    metrics.migrations.labels(role="decode").inc(2)  # a decode migration is no queue moved
    assert prefills_moved(generate_latest(metrics.registry).decode()) == 4
    assert prefills_moved("") == 0

"""`bench compare` without model stacks: deployment names and the settings each maps to, splitting
Redis timelines into runs and phases, the goodput ratio, and the combined plots and tables."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.bench.compare import (
    DEPLOYMENTS,
    PLAN_LIMITS,
    PLANNED,
    EngineKnobs,
    cap_outputs,
    common_scale_rate,
    comparison_table,
    deployment_settings,
    fetch_steps,
    fetch_timelines,
    goodput_ratio,
    main,
    parse_deployments,
    phase_breakdown,
    plot_all,
    split_by_run,
)
from services.bench.metrics import RequestRecord
from services.bench.serve import analyze, trace_workload
from services.cli import build_parser
from services.launcher import split_threads, worker_names
from services.planner.deployment import PlannedDeployment
from services.planner.workload import load_lengths
from shared.cpus import available_cpus
from shared.servers import RedisServer
from shared.state import StateWriter, push_steps, steps_key
from shared.workloads import SLO, WorkloadRequest

SLO_ = SLO(ttft_s=1.0, tpot_s=0.1)


def test_parse_deployments() -> None:
    assert parse_deployments("disagg, colocated-2x1") == ("disagg", "colocated-2x1")
    for bad in ("disagg,vllm", "", "disagg,disagg"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_deployments(bad)


def test_cli_parses_the_deployment_list() -> None:
    args = build_parser().parse_args(["bench", "compare", "--deployments", "chunked,disagg", "--rate", "1,2"])
    assert args.deployments == ("chunked", "disagg") and args.rate == (1.0, 2.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "compare", "--deployments", "nope"])


@pytest.mark.parametrize("cores", [2, 4])
def test_every_deployment_uses_exactly_the_cores_with_its_own_servers(cores: int) -> None:
    expected = {  # (mode, roles of the workers, threads per worker, chunked)
        "disagg": ("disaggregated", ["prefill", "decode"], cores // 2, False),
        "disagg-2p1d": ("disaggregated", ["prefill", "prefill", "decode"], cores // 2, False),
        "colocated": ("colocated", ["colocated"], cores, False),
        "colocated-2x1": ("colocated", ["colocated", "colocated"], cores // 2, False),
        "colocated-3x1": ("colocated", ["colocated"] * 3, cores // 2, False),
        "chunked": ("colocated", ["colocated"], cores, True),
    }
    assert set(expected) == set(DEPLOYMENTS) - set(PLANNED)
    for name, (mode, roles, threads, chunked) in expected.items():
        s = deployment_settings(name, EngineKnobs(cores=cores, chunk_tokens=128), 9123, SLO_)
        assert s.mode == mode and s.nats_url is None and s.redis_url is None and s.gateway.port == 9123
        assert (s.gateway.slo_ttft_s, s.gateway.slo_tpot_s) == (1.0, 0.1)
        assert [role for role, _ in worker_names(s)] == roles
        # the launcher keeps explicit thread counts: what we set is what runs
        started = split_threads(s, len(roles), 64)
        assert [getattr(started, role).num_threads for role in roles] == [threads] * len(roles)
        total = sum(getattr(started, role).num_threads for role in roles)
        # 3 workers on 2 cores' worth on purpose (a decode worker needs a fraction of its share); all others fit
        assert total == (cores * 3 // 2 if name in ("disagg-2p1d", "colocated-3x1") else cores)
        assert s.colocated.chunked_prefill is chunked
        if chunked:
            assert s.colocated.max_num_batched_tokens == 128


def test_a_plans_deployments_run_on_emulated_gpus_with_the_planners_limits(tmp_path: Path) -> None:
    plan = {"model": "opt-13b", "hardware": "a100-80g", "profile": "reference:distserve", "rate": 4,
            "prefill": {"tp": 2, "pp": 1, "instances": 1}, "decode": {"tp": 1, "pp": 1, "instances": 1},
            "baseline": {"tp": 2, "pp": 1, "instances": 4}, "kv_bandwidth_gbps": 2400}
    (tmp_path / "plan.yaml").write_text(json.dumps(plan))  # YAML reads JSON
    planned = PlannedDeployment.load(tmp_path / "plan.yaml")
    s = deployment_settings("plan", EngineKnobs(), 9123, SLO_, planned)
    assert (s.engine, s.model, s.mode, s.prefill.tp, s.decode.tp) == ("emulated", "opt-13b", "disaggregated", 2, 1)
    assert (s.decode.max_num_seqs, s.prefill.max_num_batched_tokens) == (PLAN_LIMITS.max_batch,
                                                                         PLAN_LIMITS.prefill_token_budget)
    b = deployment_settings("plan-baseline", EngineKnobs(), 9123, SLO_, planned)
    assert (b.mode, b.colocated.tp, b.colocated_instances) == ("colocated", 2, 1)  # on the plan's 3 GPUs: one TP2
    assert planned.simulated(baseline=True, same_gpus=True).gpus == 2
    with pytest.raises(ValueError, match="--plan"):
        deployment_settings("plan", EngineKnobs(), 9123, SLO_)


def test_the_sharegpt_trace_sends_the_planners_lengths_as_token_ids() -> None:
    requests = trace_workload(50, seed=1, max_total_tokens=2048)
    lengths = load_lengths("sharegpt", max_total_tokens=2048, tokenizer="opt")
    pairs = set(zip(lengths.inputs.tolist(), lengths.outputs.tolist(), strict=True))
    assert all(len(r.prompt) == r.input_tokens and (r.input_tokens, r.output_tokens) in pairs for r in requests)
    assert requests == trace_workload(50, seed=1, max_total_tokens=2048)


def test_dtype_knobs_reach_the_workers() -> None:
    knobs = EngineKnobs(dtype="float32", prefill_dtype="bfloat16", weights="fp16", compile=True)
    s = deployment_settings("disagg", knobs, 9123, SLO_)
    assert (s.prefill.dtype, s.prefill.weights) == ("bfloat16", "native")  # bfloat16 keeps bfloat16 weights
    assert (s.decode.dtype, s.decode.weights, s.decode.compile) == ("float32", "fp16", True)
    s = deployment_settings("colocated", EngineKnobs(dtype="bfloat16", weights="fp16"), 9123, SLO_)
    assert (s.colocated.dtype, s.colocated.weights) == ("bfloat16", "native")


def test_bad_knobs_fail_before_any_stack_starts() -> None:
    with pytest.raises(ValueError, match="cores"):
        EngineKnobs(cores=3)
    with pytest.raises(ValueError, match="dtype"):
        EngineKnobs(prefill_dtype="float16")
    args = build_parser().parse_args(["bench", "compare", "--cores", "1", "--no-progress"])
    assert main(args) == 2


def test_output_cap_clamps_lengths_and_keeps_every_request() -> None:
    reqs = [WorkloadRequest("a", 5, 300), WorkloadRequest("b", 7, 20)]
    assert [r.output_tokens for r in cap_outputs(reqs, 64)] == [64, 20]
    assert [r.prompt for r in cap_outputs(reqs, 64)] == ["a", "b"]
    assert cap_outputs(reqs, None) == reqs
    with pytest.raises(ValueError, match="output-cap"):
        cap_outputs(reqs, 0)


def state(arrived: float, **phases: float) -> dict[str, str]:
    return {"arrived": str(arrived), **{k: str(arrived + v) for k, v in phases.items()}}


def test_split_by_run_assigns_requests_to_the_run_they_arrived_in() -> None:
    warmup, a, b, c = state(5.0), state(10.5), state(11.0), state(20.1)
    runs = split_by_run([warmup, a, b, c, {"status": "queued"}], [(2.0, 20.0), (1.0, 10.0)])
    assert runs == {1.0: [a, b], 2.0: [c]}


def test_phase_breakdown() -> None:
    disagg = [state(0.0, prefill_start=0.1 * i, prefill_end=0.1 * i + 0.5, kv_transfer_start=0.1 * i + 0.6,
                     kv_transfer_end=0.1 * i + 0.7, decode_start=0.1 * i + 0.8, finish=0.1 * i + 3.8)
              for i in range(10)]
    colocated = state(0.0, prefill_start=1.0, prefill_end=1.5, decode_start=1.5, finish=2.0)
    spans = phase_breakdown([*disagg, colocated])
    assert spans["queue"]["n"] == 11 and spans["queue"]["p50"] == pytest.approx(0.5)
    assert spans["queue"]["p90"] == pytest.approx(0.9)
    assert spans["prefill"]["p50"] == pytest.approx(0.5) and spans["prefill"]["p90"] == pytest.approx(0.5)
    assert spans["to_decode"]["p50"] == pytest.approx(0.3)
    assert spans["kv_transfer"]["n"] == 10  # colocated requests have no transfer
    assert spans["decode"]["p90"] == pytest.approx(3.0)
    assert phase_breakdown([{"arrived": "1"}]) == {}


def test_the_ratio_takes_the_better_of_each_kind_and_never_chunked() -> None:
    assert goodput_ratio({"disagg": 2.0, "colocated": 0.5, "colocated-2x1": 0.8, "chunked": 1.9}) \
        == ("disagg", "colocated-2x1", pytest.approx(2.5))
    assert goodput_ratio({"disagg": 2.0, "colocated": 1.0, "colocated-2x1": None}) == ("disagg", "colocated", 2.0)
    assert goodput_ratio({"disagg": 1.0, "disagg-2p1d": 3.0, "colocated": 1.5}) == ("disagg-2p1d", "colocated", 2.0)
    assert goodput_ratio({"disagg": 2.0, "colocated": None, "chunked": 1.0}) is None
    assert goodput_ratio({"disagg": None, "disagg-2p1d": None, "colocated": 1.0}) is None


def records(rate: float, ttft: float, n: int = 10) -> list[RequestRecord]:
    return [RequestRecord(index=i, rate=rate, scheduled_s=i / rate, input_tokens=10, expected_output_tokens=5,
                          sent_s=i / rate, first_token_s=i / rate + ttft, end_s=i / rate + ttft + 0.2,
                          output_tokens=5, error=None) for i in range(n)]


def test_scale_rate_plots_and_table(tmp_path: Path) -> None:
    fast = analyze("disagg", {1.0: records(1.0, 0.2), 2.0: records(2.0, 0.5), 4.0: records(4.0, 3.0)}, SLO_)
    slow = analyze("colocated", {1.0: records(1.0, 0.5), 2.0: records(2.0, 2.0), 4.0: records(4.0, 3.0)}, SLO_)
    assert (fast.goodput, slow.goodput) == (2.0, 1.0)
    assert common_scale_rate([fast, slow], None) == 1.0  # the lower goodput: both curves start passing
    assert common_scale_rate([fast, slow], 4.0) == 4.0
    none = analyze("chunked", {4.0: records(4.0, 3.0)}, SLO_)
    assert common_scale_rate([none], None) == 4.0
    with pytest.raises(ValueError, match="share no measured rate"):
        common_scale_rate([none, analyze("x", {1.0: records(1.0, 3.0)}, SLO_)], None)
    table = comparison_table([fast, slow], goodput_ratio({"disagg": 2.0, "colocated": 1.0}))
    assert table.caption == "disagg / colocated goodput: 2.00x" and table.row_count == 2
    plot_all([fast, slow], SLO_, 1.0, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "attainment_vs_rate.png", "attainment_vs_slo_scale.png", "latency_cdf.png"]


async def test_fetch_timelines_reads_the_newest_request_states(redis_server: RedisServer) -> None:
    client = aioredis.from_url(redis_server.url)
    writer = StateWriter(client, ttl_s=60)
    future = time.time() + 1e6  # newer than anything other tests write to the shared index
    for i in range(3):
        writer.update(f"cmp-{i}", arrived=future + i, prefill_start=future + i + 0.5, status="finished")
    await writer.close()
    await client.aclose()
    states = await fetch_timelines(redis_server.url, 2)
    assert [s["request_id"] for s in states] == ["cmp-2", "cmp-1"]
    assert float(states[0]["prefill_start"]) - float(states[0]["arrived"]) == pytest.approx(0.5)


async def test_fetch_steps_keeps_the_sweeps_steps_of_every_worker(redis_server: RedisServer) -> None:
    client = aioredis.from_url(redis_server.url)
    step = {"seconds": 0.1, "prefill_lengths": [], "decode_batch": 2, "decode_context": 40}
    await push_steps(client, steps_key("decode", "cmp-decode"), [json.dumps({**step, "ended": t}) for t in (5, 15)], 60)
    await push_steps(client, steps_key("prefill", "cmp-prefill"), [json.dumps({**step, "ended": 20})], 60)
    await client.aclose()
    steps = await fetch_steps(redis_server.url, since=10)
    assert [r["ended"] for r in steps["decode:cmp-decode"]] == [15]  # the warm-up's step is left out
    assert [r["ended"] for r in steps["prefill:cmp-prefill"]] == [20]


def test_pinned_deployments_keep_the_services_on_the_last_workers_cpu() -> None:
    cpus = available_cpus()
    if len(cpus) < 2:
        pytest.skip("pinning two workers needs two CPUs")
    s = deployment_settings("disagg", EngineKnobs(pin=True), 9123, SLO_)
    assert s.pin_workers and s.service_cpus == [cpus[1]]
    assert not deployment_settings("disagg", EngineKnobs(), 9123, SLO_).pin_workers
    with pytest.raises(ValueError, match="--pin"):
        EngineKnobs(pin=True, cores=len(cpus) + 2 - len(cpus) % 2)

"""Replaying a recorded run: the simulator sees exactly the requests that were sent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.cli import main
from services.planner.latency import reference_profiles
from services.planner.replay import (
    ARTIFACT_FIELDS,
    artifact_runs,
    load_runs,
    measured_attainment,
    replay,
    server_runs,
    trace_of,
)
from services.planner.simulator import Colocated, Disaggregated, Limits, Parallel, simulate
from services.planner.workload import Trace
from shared.workloads import SLO
from tests.planner.conftest import toy_model

SLO_ = SLO(ttft_s=0.1, tpot_s=0.02)
DEPLOYMENT = Disaggregated(Parallel(1), 1, Parallel(1), 1)


def recorded_run(rate: float, n: int, seed: int) -> list[dict[str, object]]:
    """Rows as `bench serve` writes them, whose latencies are what the toy model predicts."""
    rng = np.random.default_rng(seed)
    sent = 5.0 + np.cumsum(rng.exponential(1 / rate, n))  # the run's clock does not start at 0
    inputs, outputs = rng.integers(10, 400, n), rng.integers(1, 60, n)
    result = simulate(DEPLOYMENT, toy_model(), Trace(sent - sent[0], inputs, outputs))
    return [{"index": i, "rate": rate, "sent_s": float(sent[i]), "input_tokens": int(inputs[i]) - 3,
             "prompt_tokens": int(inputs[i]), "expected_output_tokens": 64, "output_tokens": int(outputs[i]),
             "ttft": float(result.ttft[i]), "tpot": None if outputs[i] < 2 else float(result.tpot[i])}
            for i in range(n)]


def test_a_run_the_model_produced_is_predicted_exactly(tmp_path: Path) -> None:
    rows = recorded_run(20.0, 200, 0) + recorded_run(60.0, 200, 1) + [{"rate": "inf"}]
    path = tmp_path / "requests.json"
    path.write_text(json.dumps(rows))
    points = replay(load_runs(path), DEPLOYMENT, toy_model(), SLO_, Limits())
    assert [p.rate for p in points] == [20.0, 60.0]
    for point in points:
        assert point.predicted == pytest.approx(point.measured) and point.requests == 200
        assert point.measured_ttft > 0 and point.predicted_ttft == pytest.approx(point.measured_ttft)
        assert point.measured_tpot > 0 and point.predicted_tpot == pytest.approx(point.measured_tpot)
    assert points[1].measured < points[0].measured  # the load shows: the check is not vacuous


def test_trace_uses_server_prompt_lengths_and_send_times() -> None:
    rows = recorded_run(10.0, 5, 2)
    rows.reverse()
    trace = trace_of(rows)
    assert trace.arrivals[0] == 0 and np.all(np.diff(trace.arrivals) > 0)
    assert sorted(trace.inputs.tolist()) == sorted(int(r["prompt_tokens"]) for r in rows)  # type: ignore[call-overload]


def test_failed_requests_count_as_misses() -> None:
    rows = [{"ttft": 0.05, "tpot": 0.01}, {"ttft": None, "tpot": None}, {"ttft": 0.05, "tpot": 0.5},
            {"ttft": 0.05, "tpot": None}]
    assert measured_attainment(rows, SLO_) == 0.5


def test_simulate_command_prints_the_comparison(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from services.planner.latency import save_profiles

    save_profiles(tmp_path / "profile.json", [toy_model(tps=(1,))])
    (tmp_path / "requests.json").write_text(json.dumps(recorded_run(20.0, 100, 3)))
    code = main(["simulate", "--profile", str(tmp_path / "profile.json"), "--requests",
                 str(tmp_path / "requests.json"), "--ttft", "0.1", "--tpot", "0.02"])
    out = capsys.readouterr().out
    assert code == 0 and "largest difference: 0.0 percentage points" in out
    assert main(["simulate", "--profile", str(tmp_path / "nope.json"), "--requests", "x", "--ttft", "1",
                 "--tpot", "1"]) == 2


def test_server_side_rows_come_from_the_gateways_stamps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """timelines.json (what the services wrote in Redis) replays like requests.json, timed by the gateway."""
    rows = recorded_run(20.0, 100, 4)
    states = [{"status": "finished", "arrived": str(r["sent_s"]), "prompt_tokens": str(r["prompt_tokens"]),
               "max_tokens": "64", "output_tokens": str(r["output_tokens"]),
               "first_token": str(r["sent_s"] + r["ttft"]),  # type: ignore[operator]
               "finish": str(r["sent_s"] + r["ttft"] + (r["tpot"] or 0) * (r["output_tokens"] - 1))}  # type: ignore
              for r in rows]
    states.append({"status": "failed", "arrived": "9.0", "prompt_tokens": "12", "max_tokens": "8"})
    states.append({"status": "queued"})  # never reached the gateway's bookkeeping: not a request to replay
    (tmp_path / "timelines.json").write_text(json.dumps({"20.0": states}))
    (run,) = server_runs(tmp_path / "timelines.json").values()
    assert len(run) == 101 and run[-1]["ttft"] is None  # the failed one counts as a miss
    for got, want in zip(run, rows, strict=False):
        assert got["ttft"] == pytest.approx(want["ttft"]) and got["sent_s"] == want["sent_s"]
        assert (got["tpot"] is None) == (want["tpot"] is None)
    assert measured_attainment(run, SLO_) == pytest.approx(measured_attainment(rows, SLO_) * 100 / 101)

    from services.planner.latency import save_profiles

    save_profiles(tmp_path / "profile.json", [toy_model(tps=(1,))])
    (tmp_path / "requests.json").write_text(json.dumps([{"rate": "inf"}]))  # the client's view is not read
    assert main(["simulate", "--profile", str(tmp_path / "profile.json"), "--requests",
                 str(tmp_path / "requests.json"), "--ttft", "0.1", "--tpot", "0.02", "--server-side"]) == 0
    assert "by the gateway" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no request timelines"):
        server_runs(_write(tmp_path / "empty.json", {"20.0": [{"status": "queued"}]}))


def artifact_records(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Rows as the DistServe artifact's client recorded them (times in seconds of its clock, latencies in ms)."""
    return [{"prompt_len": r["prompt_tokens"], "output_len": r["output_tokens"], "issue_time": r["sent_s"],
             "first_token_time": r["sent_s"] + r["ttft"],  # type: ignore[operator]
             "ttft_ms": r["ttft"] * 1e3, "tpot_ms": (r["tpot"] or 0.0) * 1e3}  # type: ignore[operator]
            for r in rows]


def test_the_artifacts_runs_replay_like_ours(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its .exp files (a Python literal) and CSV copies of them; the rate comes from the file's name."""
    fast, slow = recorded_run(20.0, 150, 5), recorded_run(60.0, 150, 6)
    (tmp_path / "distserve-c11d11-150-20.exp").write_text(repr(artifact_records(fast)) + "\nnum_requests: 150\n")
    records = artifact_records(slow)
    lines = [",".join(records[0])] + [",".join(repr(v) for v in r.values()) for r in records]
    (tmp_path / "distserve-c11d11-150-60.csv").write_text("\n".join(lines) + "\n")
    runs = artifact_runs(sorted(tmp_path.iterdir()))
    assert sorted(runs) == [20.0, 60.0] and len(runs[60.0]) == 150
    points = replay(runs, DEPLOYMENT, toy_model(), SLO_, Limits())
    for point, rows in zip(points, (fast, slow), strict=True):
        assert point.predicted == pytest.approx(point.measured) == pytest.approx(measured_attainment(rows, SLO_))
    assert points[1].measured < points[0].measured

    from services.planner.latency import save_profiles

    save_profiles(tmp_path / "profile.json", [toy_model(tps=(1,))])
    files = [str(tmp_path / "distserve-c11d11-150-20.exp"), str(tmp_path / "distserve-c11d11-150-60.csv")]
    args = ["simulate", "--profile", str(tmp_path / "profile.json"), "--ttft", "0.1", "--tpot", "0.02",
            "--artifact-runs", *files]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "prefill TP1xPP1, decode TP1xPP1" in out and "largest difference: 0.0 percentage points" in out


def test_artifact_runs_reject_what_they_cannot_replay(tmp_path: Path) -> None:
    good = repr(artifact_records(recorded_run(5.0, 3, 7)))
    for name, text, error in [("vllm.exp", good, "name ending in -<rate>"), ("vllm-10-2.exp", "[]", "no requests"),
                              ("vllm-10-3.exp", "[{'prompt_len': 3}]", "no field output_len"),
                              ("vllm-10-5.csv", ",".join(ARTIFACT_FIELDS) + "\n1,,0,1,1\n", "a bad request record")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=error):
            artifact_runs([tmp_path / name])
    (tmp_path / "a-10-2.exp").write_text(good)
    (tmp_path / "b-20-2.exp").write_text(good)
    with pytest.raises(ValueError, match="second run at rate 2"):
        artifact_runs([tmp_path / "a-10-2.exp", tmp_path / "b-20-2.exp"])
    (tmp_path / "evil-10-4.exp").write_text("__import__('os').system('true')")
    with pytest.raises(ValueError, match="not a list of request records"):  # a literal only: nothing runs
        artifact_runs([tmp_path / "evil-10-4.exp"])


def test_simulate_with_the_reference_profiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An A100 run replays with the published profiles: DistServe's for disagg, vLLM's for colocated."""
    (tmp_path / "vllm-20-1.exp").write_text(repr(artifact_records(recorded_run(1.0, 20, 8))))
    run = str(tmp_path / "vllm-20-1.exp")
    common = ["simulate", "--profile", "reference", "--ttft", "0.25", "--tpot", "0.1", "--artifact-runs", run]
    assert main([*common, "--model", "opt-13b", "--deployment", "colocated", "--tp", "2"]) == 0
    assert "1 x TP2xPP1" in capsys.readouterr().out
    assert main([*common, "--model", "opt-13b", "--prefill", "2x1", "--decode", "1x2"]) == 0
    assert "prefill TP2xPP1, decode TP1xPP2" in capsys.readouterr().out
    assert main(common) == 2 and "needs --model" in capsys.readouterr().err
    for missing in (["--artifact-runs", str(tmp_path / "vllm-1-2.exp")], ["--requests", str(tmp_path / "r.json")]):
        args = ["simulate", "--profile", "reference", "--model", "opt-13b", "--ttft", "1", "--tpot", "1", *missing]
        assert main(args) == 2 and "No such file" in capsys.readouterr().err
    assert main([*common, "--model", "opt-13b", "--prefill", "3x1"]) == 2  # no TP3 profile for OPT-13B
    with pytest.raises(SystemExit):
        main([*common, "--model", "opt-13b", "--prefill", "2y1"])


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


A100_RUNS = Path(__file__).parents[2] / "services" / "planner" / "profiles" / "a100-runs"


def test_the_simulator_against_the_artifacts_a100_runs() -> None:
    """The DistServe artifact's measured OPT-13B runs (ShareGPT, A100s) replayed with the published profiles.

    Below the knee (up to 2 req/s per GPU) the simulator predicts DistServe's attainment within 3 pp;
    and it reaches the runs' verdicts: prefill TP2 + decode TP1 meets 90% at 6 req/s on 3 GPUs, vLLM at
    TP1 meets 90% at no measured rate (docs/planner.md has the whole comparison).
    """
    slo = SLO(ttft_s=0.25, tpot_s=0.1)
    profiles = {name: reference_profiles(name)["opt-13b"] for name in ("distserve", "vllm")}
    # the batch limits the artifact's servers ran with (evaluation/2-benchmark-serving/2-start-api-server.py)
    disagg = replay(artifact_runs(sorted(A100_RUNS.glob("distserve-c21d11-*.csv"))),
                    Disaggregated(Parallel(2), 1, Parallel(1), 1), profiles["distserve"], slo,
                    Limits(prefill_token_budget=32768, max_batch=1024))
    assert [p.rate for p in disagg] == [3, 4.5, 6, 7.5, 9, 10.5, 12]
    for point in disagg[:3]:
        assert abs(point.error_pp) <= 3 and point.measured >= 0.9 and point.predicted >= 0.9
    # Past the knee the published profile is optimistic (+13 pp at 9 req/s): served decode steps ran longer.
    assert max(p.error_pp for p in disagg) > 10
    # A constant 12 ms per decode step (calibrated on the 4.5, 7.5 and 10.5 req/s runs) brings every run,
    # the four it was not fitted on included, within 3 pp: one standard error of a 300-request run there.
    served = replay(artifact_runs(sorted(A100_RUNS.glob("distserve-c21d11-*.csv"))),
                    Disaggregated(Parallel(2), 1, Parallel(1), 1), profiles["distserve"].with_decode_overhead(12),
                    slo, Limits(prefill_token_budget=32768, max_batch=1024))
    assert max(abs(p.error_pp) for p in served) <= 3.0
    colocated = replay(artifact_runs(sorted(A100_RUNS.glob("vllm-tp1-*.csv"))), Colocated(Parallel(1)),
                       profiles["vllm"], slo, Limits(prefill_token_budget=65536, max_batch=1024))
    assert len(colocated) == 7
    assert max(p.measured for p in colocated) < 0.9 and max(p.predicted for p in colocated) < 0.9

"""Replaying a recorded run: the simulator sees exactly the requests that were sent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.cli import main
from services.planner.replay import load_runs, measured_attainment, replay, server_runs, trace_of
from services.planner.simulator import Disaggregated, Limits, Parallel, simulate
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


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path

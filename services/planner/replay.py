"""Simulator vs reality: replay a measured benchmark run through the simulator, rate by rate.

`distserve bench serve|compare` write every request of a run (requests.json: its rate, when it was
sent, the server's prompt token count, the tokens it generated, and its measured TTFT and TPOT).
The same requests, at the same send times and with the same lengths, go through the simulator with
a latency profile of this machine (`distserve profile`); the SLO attainment it predicts is set next
to the attainment that was measured.

`bench compare` also writes timelines.json: the same requests as the services stamped them in Redis.
`server_runs` turns those into rows of the same shape, with TTFT and TPOT as the gateway saw them
(from a request's arrival to its first token, and from there to its last): the system's latencies
without the load generator's own, which on a small machine competes with the services for CPU.

`artifact_runs` reads the runs the DistServe artifact measured on A100s (its `.exp` files: one Python
list of per-request records, named `<system>-<requests>-<rate>.exp`), or our CSV copies of them, so
the simulator with the A100 reference profiles can be checked against real GPUs.
"""

from __future__ import annotations

import ast
import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.planner.latency import LatencyModel
from services.planner.simulator import Deployment, Limits, simulate
from services.planner.workload import Trace
from shared.workloads import SLO


@dataclass(frozen=True)
class RatePoint:
    rate: float
    requests: int
    measured: float  # SLO attainment, 0..1
    predicted: float
    # p50 latencies (seconds, nan if none), to show which phase a difference in attainment comes from
    measured_ttft: float = math.nan
    predicted_ttft: float = math.nan
    measured_tpot: float = math.nan
    predicted_tpot: float = math.nan

    @property
    def error_pp(self) -> float:
        return 100 * (self.predicted - self.measured)


def load_runs(path: Path) -> dict[float, list[Mapping[str, Any]]]:
    """requests.json rows grouped by rate (runs with rate "inf" have no arrival process to replay)."""
    rows = json.loads(path.read_text())
    runs: dict[float, list[Mapping[str, Any]]] = {}
    for row in rows:
        rate = float(row["rate"])
        if math.isfinite(rate):
            runs.setdefault(rate, []).append(row)
    if not runs:
        raise ValueError(f"{path} has no requests sent at a finite rate")
    return runs


def server_runs(path: Path) -> dict[float, list[Mapping[str, Any]]]:
    """timelines.json (rate -> request states) as requests.json-like rows, timed by the gateway's stamps."""
    runs: dict[float, list[Mapping[str, Any]]] = {}
    for rate, states in json.loads(path.read_text()).items():
        rows: list[Mapping[str, Any]] = []
        for st in states:
            if "arrived" not in st or "prompt_tokens" not in st:
                continue
            arrived = float(st["arrived"])
            first, finish = st.get("first_token"), st.get("finish")
            outputs = int(st.get("output_tokens", 0))
            ok = st.get("status") == "finished" and first is not None
            rows.append({
                "rate": float(rate), "sent_s": arrived, "prompt_tokens": int(st["prompt_tokens"]),
                "input_tokens": int(st["prompt_tokens"]), "output_tokens": outputs,
                "expected_output_tokens": int(st.get("max_tokens", 1)),
                "ttft": float(first) - arrived if ok else None,
                "tpot": (float(finish) - float(first)) / (outputs - 1) if ok and finish and outputs > 1 else None,
            })
        if rows and math.isfinite(float(rate)):
            runs[float(rate)] = rows
    if not runs:
        raise ValueError(f"{path} has no request timelines")
    return runs


ARTIFACT_FIELDS = ("prompt_len", "output_len", "issue_time", "ttft_ms", "tpot_ms")


def artifact_runs(paths: Sequence[Path]) -> dict[float, list[Mapping[str, Any]]]:
    """The DistServe artifact's measured runs as requests.json-like rows, by the rate in each file's name.

    A file is the artifact's `.exp` (its first line a Python literal, read with ast.literal_eval: nothing is
    executed) or a `.csv` with a header naming at least ARTIFACT_FIELDS.
    """
    runs: dict[float, list[Mapping[str, Any]]] = {}
    for path in paths:
        try:
            rate = float(path.stem.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            raise ValueError(f"{path.name}: expected a name ending in -<rate>, e.g. vllm-300-3.exp") from None
        if rate in runs:
            raise ValueError(f"{path.name}: a second run at rate {rate:g}")
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                records: list[Mapping[str, Any]] = list(csv.DictReader(f))
        else:
            try:  # the records are the first line; a summary of the run follows
                with path.open() as f:
                    literal = ast.literal_eval(f.readline())
            except (SyntaxError, ValueError):
                literal = None
            if not isinstance(literal, list) or not all(isinstance(r, dict) for r in literal):
                raise ValueError(f"{path.name}: not a list of request records")
            records = literal
        missing = [name for name in ARTIFACT_FIELDS if records and name not in records[0]]
        if not records or missing:
            raise ValueError(f"{path.name}: no requests" if not records else f"{path.name}: no field {missing[0]}")
        try:
            runs[rate] = [_artifact_row(rate, r) for r in records]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path.name}: a bad request record ({type(e).__name__}: {e})") from None
    if not runs:
        raise ValueError("no runs given")
    return runs


def _artifact_row(rate: float, r: Mapping[str, Any]) -> Mapping[str, Any]:
    outputs = int(r["output_len"])
    return {"rate": rate, "sent_s": float(r["issue_time"]), "prompt_tokens": int(r["prompt_len"]),
            "input_tokens": int(r["prompt_len"]), "output_tokens": outputs, "expected_output_tokens": outputs,
            "ttft": float(r["ttft_ms"]) / 1e3, "tpot": float(r["tpot_ms"]) / 1e3 if outputs > 1 else None}


def measured_attainment(rows: Sequence[Mapping[str, Any]], slo: SLO) -> float:
    """Fraction of requests that finished within both SLOs (failed ones count as misses)."""
    met = [row["ttft"] is not None and row["ttft"] <= slo.ttft_s
           and (row["tpot"] is None or row["tpot"] <= slo.tpot_s) for row in rows]
    return sum(met) / len(met)


def trace_of(rows: Sequence[Mapping[str, Any]]) -> Trace:
    """The run as the simulator sees it: send times from zero, the server's prompt lengths, the outputs."""
    sent = [r for r in rows if r.get("sent_s") is not None]
    sent.sort(key=lambda r: r["sent_s"])
    start = sent[0]["sent_s"]
    arrivals = np.array([r["sent_s"] - start for r in sent], dtype=float)
    inputs = np.array([r.get("prompt_tokens") or r["input_tokens"] for r in sent], dtype=np.int64)
    outputs = np.array([max(1, r["output_tokens"] or r["expected_output_tokens"]) for r in sent], dtype=np.int64)
    return Trace(arrivals, inputs, outputs)


def _p50(values: Sequence[float | None] | np.ndarray) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.median(finite)) if finite else math.nan


def replay(runs: Mapping[float, Sequence[Mapping[str, Any]]], deployment: Deployment, model: LatencyModel,
           slo: SLO, limits: Limits) -> list[RatePoint]:
    points = []
    for rate, rows in sorted(runs.items()):
        trace = trace_of(rows)
        result = simulate(deployment, model, trace, limits=limits, slo=slo)
        points.append(RatePoint(rate, len(rows), measured_attainment(rows, slo), result.attainment(slo),
                                _p50([r["ttft"] for r in rows]), _p50(result.ttft),
                                _p50([r["tpot"] for r in rows]), _p50(result.tpot[trace.outputs > 1])))
    return points

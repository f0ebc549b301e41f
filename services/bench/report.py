"""Writing benchmark results: per-request JSON and CSV, the summary JSON and a terminal table."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

from services.bench.metrics import RequestRecord, RunSummary


def write_records(records: Sequence[RequestRecord], directory: Path) -> None:
    """requests.json and requests.csv: one row per request, stored and derived fields."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in records]
    (directory / "requests.json").write_text(json.dumps(_finite(rows), indent=1) + "\n")
    with (directory / "requests.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["index"])
        writer.writeheader()
        writer.writerows(rows)


def write_summary(summary: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "summary.json").write_text(json.dumps(_finite(summary), indent=1) + "\n")


def _finite(value: Any) -> Any:
    """JSON has no infinity: rate=inf (all requests at once) is written as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def summary_dict(summary: RunSummary) -> dict[str, Any]:
    return asdict(summary)


def summary_table(runs: Sequence[RunSummary], title: str) -> Table:
    table = Table(title=title)
    for name in ("rate", "done/n", "err", "req/s", "tok/s", "TTFT p50/p90/p99 (s)", "TPOT p50/p90/p99 (ms)",
                 "attain", "TTFT ok", "TPOT ok"):
        table.add_column(name, justify="right")
    for r in sorted(runs, key=lambda r: r.rate):
        table.add_row(
            f"{r.rate:g}",
            f"{r.completed}/{r.num_requests}",
            str(r.errors),
            f"{r.throughput_rps:.2f}",
            f"{r.output_tokens_per_s:.1f}",
            _triple(r.ttft_p50, r.ttft_p90, r.ttft_p99, 1, "{:.2f}"),
            _triple(r.tpot_p50, r.tpot_p90, r.tpot_p99, 1000, "{:.0f}"),
            f"{100 * r.attainment:.1f}%",
            f"{100 * r.ttft_attainment:.1f}%",
            f"{100 * r.tpot_attainment:.1f}%",
        )
    return table


def _triple(a: float | None, b: float | None, c: float | None, scale: float, fmt: str) -> str:
    return "/".join("-" if v is None else fmt.format(v * scale) for v in (a, b, c))

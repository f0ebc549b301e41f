"""PNG plots of benchmark results. Every plot takes ``{label: data}`` so one deployment or several
(``bench compare``) share the same axes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from services.bench.metrics import RequestRecord, RunSummary  # noqa: E402
from shared.workloads import SLO  # noqa: E402


def plot_attainment_vs_rate(series: Mapping[str, Sequence[RunSummary]], slo: SLO, path: Path,
                            title: str = "") -> None:
    """SLO attainment (both SLOs; dashed: TTFT only, dotted: TPOT only) against request rate."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for color, (label, runs) in zip(_colors(), series.items(), strict=False):
        runs = sorted((r for r in runs if math.isfinite(r.rate)), key=lambda r: r.rate)
        rates = [r.rate for r in runs]
        ax.plot(rates, [100 * r.attainment for r in runs], "o-", color=color, label=label)
        ax.plot(rates, [100 * r.ttft_attainment for r in runs], "--", color=color, alpha=0.5)
        ax.plot(rates, [100 * r.tpot_attainment for r in runs], ":", color=color, alpha=0.5)
    ax.axhline(100 * slo.attainment_target, color="grey", lw=0.8)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title or f"attainment vs rate (TTFT {slo.ttft_s:g}s, TPOT {slo.tpot_s:g}s)")
    ax.legend(title="solid: both, dashed: TTFT, dotted: TPOT", fontsize=8, title_fontsize=8)
    _save(fig, path)


def plot_attainment_vs_scale(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], slo: SLO,
                             path: Path, title: str = "") -> None:
    """Attainment against the SLO scale (both bounds times the scale) at one rate per series."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for color, (label, (scales, attainments)) in zip(_colors(), series.items(), strict=False):
        ax.plot(scales, [100 * a for a in attainments], "-", color=color, label=label)
    ax.axhline(100 * slo.attainment_target, color="grey", lw=0.8)
    ax.axvline(1.0, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel(f"SLO scale (1 = TTFT {slo.ttft_s:g}s, TPOT {slo.tpot_s:g}s; smaller is tighter)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title or "attainment vs SLO scale")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_latency_cdfs(series: Mapping[str, Sequence[RequestRecord]], slo: SLO, path: Path,
                      title: str = "") -> None:
    """Empirical CDFs of TTFT and TPOT over successful requests, with the SLOs as vertical lines."""
    fig, (ax_ttft, ax_tpot) = plt.subplots(1, 2, figsize=(10, 4))
    for color, (label, records) in zip(_colors(), series.items(), strict=False):
        for ax, values in ((ax_ttft, [r.ttft for r in records]), (ax_tpot, [r.tpot for r in records])):
            xs = np.sort([v for v in values if v is not None])
            if len(xs):
                ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", color=color, label=label)
    for ax, bound, name in ((ax_ttft, slo.ttft_s, "TTFT"), (ax_tpot, slo.tpot_s, "TPOT")):
        ax.axvline(bound, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(f"{name} (s); dashed: SLO {bound:g}s")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
    fig.suptitle(title or "latency CDFs (successful requests)")
    _save(fig, path)


def plot_scaling_runs(series: Mapping[str, tuple[Sequence[tuple[float, float]], Sequence[tuple[float, int]], float]],
                      slo: SLO, bin_s: float, boundaries: Sequence[float], title: str, path: Path) -> None:
    """Attainment over time (per bin of arrivals) above the GPUs in use, one line per run; `series`:
    label -> (attainment bins, GPU samples, GPU-seconds)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for color, (label, (bins, gpus, gpu_seconds)) in zip(_colors(), series.items(), strict=False):
        top.plot([t + bin_s / 2 for t, _ in bins], [100 * a for _, a in bins], "o-", color=color, label=label)
        bottom.step([t for t, _ in gpus], [g for _, g in gpus], where="post", color=color,
                    label=f"{label}: {gpu_seconds:.0f} GPU-s")
    for boundary in boundaries:
        for ax in (top, bottom):
            ax.axvline(boundary, color="grey", linestyle=":")
    top.axhline(100 * slo.attainment_target, color="grey", linestyle="--")
    top.set_ylabel(f"SLO attainment % ({bin_s:g} s bins)")
    top.set_ylim(0, 105)
    top.legend()
    bottom.set_ylabel("emulated GPUs in use")
    bottom.set_xlabel("seconds")
    bottom.legend()
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def _colors() -> list[str]:
    return [f"C{i}" for i in range(10)]


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

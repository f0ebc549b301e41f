"""Attainment-vs-rate curves of a plan and its colocated baseline, per GPU, as a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from services.planner.goodput import attainment_at  # noqa: E402
from services.planner.latency import LatencyModel  # noqa: E402
from services.planner.placement import Plan, Problem  # noqa: E402
from services.planner.simulator import Colocated, Deployment  # noqa: E402


def sweep(deployment: Deployment, model: LatencyModel, problem: Problem, per_gpu_rates: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(total, TTFT-only, TPOT-only) SLO attainment at each per-GPU rate."""
    rows = []
    for x in per_gpu_rates:
        r = attainment_at(deployment, model, problem.trace, float(x) * deployment.gpus, problem.slo,
                          limits=problem.limits)
        rows.append((r.attainment(problem.slo), r.ttft_attainment(problem.slo), r.tpot_attainment(problem.slo)))
    a = np.array(rows)
    return a[:, 0], a[:, 1], a[:, 2]


def plot_curves(plan: Plan, problem: Problem, baseline_model: LatencyModel | None, path: str | Path,
                points: int = 16) -> None:
    top = 2.0 * max(plan.goodput_per_gpu, plan.baseline.per_gpu_goodput if plan.baseline else 0.0)
    xs = np.linspace(top / points, top, points)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    d = plan.deployment()
    label = (f"disaggregated: {plan.prefill.instances}x prefill TP{plan.prefill.config.tp}PP{plan.prefill.config.pp}"
             f" + {plan.decode.instances}x decode TP{plan.decode.config.tp}PP{plan.decode.config.pp}")
    total, ttft, tpot = sweep(d, problem.model, problem, xs)
    ax.plot(xs, 100 * total, "o-", color="tab:blue", label=label)
    ax.plot(xs, 100 * ttft, ":", color="tab:blue", alpha=0.6, label="  TTFT only")
    ax.plot(xs, 100 * tpot, "--", color="tab:blue", alpha=0.6, label="  TPOT only")
    if plan.baseline and baseline_model:
        c = Colocated(plan.baseline.config)
        total, _, _ = sweep(c, baseline_model, problem, xs)
        ax.plot(xs, 100 * total, "s-", color="tab:orange", label=f"colocated (vLLM profile) TP{c.config.tp}")
    ax.axhline(100 * problem.slo.attainment_target, color="gray", lw=0.8)
    ax.set_xlabel("rate per GPU (requests/s/GPU)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.set_title(f"{plan.model}: TTFT {plan.slo.ttft_s:g} s, TPOT {plan.slo.tpot_s:g} s ({plan.source})", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

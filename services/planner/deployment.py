"""A plan, deployed: the settings that start exactly what `distserve plan --yaml` planned.

`up --plan plan.yaml` and `bench compare --plan plan.yaml` read the plan here and turn it into the
settings overrides of a stack: the planned number of prefill and decode instances with their TP and
PP (or the plan's colocated baseline). A plan made from the published A100 profiles (`reference`) or
the analytical one (`roofline`) runs on the emulated GPU engine with that profile, the plan's GPU and
its KV link; a plan from this machine's measured profile runs the torch engine, which serves TP1 x PP1
instances only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.planner.simulator import Colocated, Deployment, Disaggregated, Parallel
from services.planner.specs import gpu_spec


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PlannedPhase(_Part):
    tp: int = Field(ge=1)
    pp: int = Field(default=1, ge=1)
    instances: int = Field(ge=1)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.instances


class PlannedBaseline(PlannedPhase):
    instances: int = Field(ge=0)  # 0: no colocated deployment meets the SLO, at any rate


class PlannedSLO(_Part):
    ttft: float = Field(gt=0)
    tpot: float = Field(gt=0)
    attainment: float = Field(default=0.9, gt=0, le=1)


class PlannedCluster(_Part):
    nodes: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=8, ge=1)


class PlannedDeployment(_Part):
    """The parts of a plan (services/planner/report.py's `plan_to_dict`) that say what to start."""

    model: str
    hardware: str
    profile: str  # the plan's profile source: reference:distserve, roofline, measured:..., file
    rate: float
    prefill: PlannedPhase
    decode: PlannedPhase
    baseline: PlannedBaseline | None = None  # the colocated deployment it was compared with
    kv_bandwidth_gbps: float = Field(gt=0)
    slo: PlannedSLO | None = None  # what it was planned for (the online planner replans for the same)
    cluster: PlannedCluster = PlannedCluster()

    @classmethod
    def load(cls, path: str | Path) -> PlannedDeployment:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"plan {path}: {exc}") from exc
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"plan {path} is not a plan from `distserve plan --yaml` ({fields})") from None

    @property
    def emulated(self) -> bool:
        """A plan for GPUs (published or analytical profiles) runs on emulated GPUs here."""
        return self.profile.startswith("reference") or self.profile == "roofline"

    @property
    def gpus(self) -> int:
        return self.prefill.gpus + self.decode.gpus

    def engine_overrides(self) -> dict[str, Any]:
        if not self.emulated:
            return {"engine": "torch"}
        profile = "reference" if self.profile.startswith("reference") else "roofline"
        return {"engine": "emulated", "model": self.model,
                "emulation": {"gpu": gpu_spec(self.hardware).name, "profile": profile,
                              "link_gbps": self.kv_bandwidth_gbps}}

    def planner_args(self) -> list[str]:
        """`distserve planner` flags that replan this deployment's problem from the traffic."""
        if self.slo is None:
            raise ValueError("the plan records no SLO to replan for")
        profile = "reference" if self.profile.startswith("reference") else self.profile
        return ["--model", self.model, "--gpu", gpu_spec(self.hardware).name, "--profile", profile,
                "--ttft", str(self.slo.ttft), "--tpot", str(self.slo.tpot), "--attainment", str(self.slo.attainment),
                "--nodes", str(self.cluster.nodes), "--gpus-per-node", str(self.cluster.gpus_per_node)]

    def colocated(self, same_gpus: bool = False) -> PlannedBaseline:
        """The plan's colocated baseline: as the plan sized it for its rate, or on as many GPUs as the plan
        (`same_gpus`: the comparison per GPU of the paper)."""
        if self.baseline is None:
            raise ValueError("this plan has no colocated baseline")
        if not same_gpus:
            if self.baseline.instances == 0:
                raise ValueError("the plan's colocated baseline meets the SLO at no rate: it has no instances")
            return self.baseline
        per_instance = self.baseline.tp * self.baseline.pp
        return self.baseline.model_copy(update={"instances": max(1, self.gpus // per_instance)})

    def overrides(self, baseline: bool = False, same_gpus: bool = False) -> dict[str, Any]:
        """Settings overrides (load_settings' nested dict) that start this deployment, or its baseline."""
        if not baseline:
            return {**self.engine_overrides(), "mode": "disaggregated",
                    "prefill_instances": self.prefill.instances, "decode_instances": self.decode.instances,
                    "prefill": {"tp": self.prefill.tp, "pp": self.prefill.pp},
                    "decode": {"tp": self.decode.tp, "pp": self.decode.pp}}
        b = self.colocated(same_gpus)
        return {**self.engine_overrides(), "mode": "colocated", "colocated_instances": b.instances,
                "colocated": {"tp": b.tp, "pp": b.pp}}

    def simulated(self, baseline: bool = False, same_gpus: bool = False) -> Deployment:
        """The same deployment as the simulator's."""
        if not baseline:
            p, d = self.prefill, self.decode
            return Disaggregated(Parallel(p.tp, p.pp), p.instances, Parallel(d.tp, d.pp), d.instances,
                                 kv_bandwidth=self.kv_bandwidth_gbps * 1e9 / 8)
        b = self.colocated(same_gpus)
        return Colocated(Parallel(b.tp, b.pp), b.instances)

    def describe(self, baseline: bool = False, same_gpus: bool = False) -> str:
        if baseline:
            b = self.colocated(same_gpus)
            return f"{b.instances} colocated TP{b.tp}xPP{b.pp} ({b.gpus} GPUs)"
        p, d = self.prefill, self.decode
        return (f"{p.instances} prefill TP{p.tp}xPP{p.pp} + {d.instances} decode TP{d.tp}xPP{d.pp} "
                f"({self.gpus} GPUs)")


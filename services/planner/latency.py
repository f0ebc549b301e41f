"""The latency model: how long one engine step takes, for one model on one kind of GPU.

    prefill  T = A + B * sum(l) + C * sum(l^2)     over the prompt lengths l in the batch
    decode   T = A + B * sum(ctx) + C * batch       small- and large-batch fits, split at `threshold`

One ``StepProfile`` per tensor-parallel degree (TP changes the coefficients); pipeline parallelism
splits a step into ``pp`` equal stages of T / pp. Coefficients are in milliseconds, the unit of the
published profiles; the methods return seconds. The same class holds the A100 reference profiles,
analytical roofline profiles and the profile measured on this machine, so every planner path is the
same code. Profile files (our JSON format, or the published DistServe format as it is) load here.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from services.planner.specs import model_key, model_shape

FORMAT = "distserve-profile/1"
DEFAULT_THRESHOLD = 95  # the published profiles' small/large decode batch split


@dataclass(frozen=True)
class Coeffs:
    """T(ms) = a + b * x + c * y."""

    a: float
    b: float
    c: float

    def ms(self, x: float, y: float) -> float:
        return self.a + self.b * x + self.c * y

    def as_list(self) -> list[float]:
        return [self.a, self.b, self.c]


@dataclass(frozen=True)
class FitError:
    """Relative error of a least-squares fit over its samples."""

    samples: int
    mean_rel: float
    max_rel: float


@dataclass(frozen=True)
class StepProfile:
    """Step times at one tensor-parallel degree."""

    prefill: Coeffs
    decode_small: Coeffs
    decode_large: Coeffs
    threshold: int = DEFAULT_THRESHOLD
    fit_error: Mapping[str, FitError] = field(default_factory=dict)

    def prefill_time(self, sum_len: float, sum_sq: float) -> float:
        return self.prefill.ms(sum_len, sum_sq) / 1000.0

    def decode_coeffs(self, batch: float) -> Coeffs:
        return self.decode_small if batch <= self.threshold else self.decode_large

    def decode_time(self, batch: int, sum_ctx: float) -> float:
        return self.decode_coeffs(batch).ms(sum_ctx, batch) / 1000.0

    def with_decode_overhead(self, ms: float) -> StepProfile:
        """Every decode step `ms` longer (the serving loop's own time per step, which a kernel profile
        leaves out: docs/planner.md, the artifact's runs)."""
        def longer(c: Coeffs) -> Coeffs:
            return Coeffs(c.a + ms, c.b, c.c)

        return replace(self, decode_small=longer(self.decode_small), decode_large=longer(self.decode_large))

    def decode_round(self, batch: int, sum_ctx: float, pp: int = 1) -> float:
        """One token for each of `batch` requests over `pp` stages: k = min(pp, batch) micro-batches
        each take 1/k of the batch's work, A + (B * sum_ctx + C * batch) / k in all."""
        k = min(pp, batch)
        c = self.decode_coeffs(batch / k)
        return (c.a + (c.b * sum_ctx + c.c * batch) / k) / 1000.0


@dataclass(frozen=True)
class LatencyModel:
    """One model on one hardware: step profiles by TP degree plus the KV memory limit.

    KV capacity (tokens an instance of tp*pp GPUs can cache) is read from ``capacity_table`` when it
    lists the configuration, else ``(tp*pp*usable_bytes_per_gpu - weight_bytes) / kv_bytes_per_token``.
    """

    model: str
    hardware: str
    source: str
    steps: Mapping[int, StepProfile]
    kv_bytes_per_token: int
    usable_bytes_per_gpu: float
    weight_bytes: float
    capacity_table: Mapping[tuple[int, int], int] = field(default_factory=dict)
    max_pp: int | None = None  # None: any pipeline depth (GPUs); 1 for a machine that cannot pipeline

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError(f"profile for {self.model} has no tensor-parallel entries")
        if self.kv_bytes_per_token <= 0:
            raise ValueError(f"profile for {self.model}: kv_bytes_per_token must be positive")

    @property
    def tp_degrees(self) -> list[int]:
        return sorted(self.steps)

    def step(self, tp: int) -> StepProfile:
        if tp not in self.steps:
            raise ValueError(f"profile for {self.model} on {self.hardware} has no TP={tp} (has {self.tp_degrees})")
        return self.steps[tp]

    def allows(self, tp: int, pp: int) -> bool:
        return tp in self.steps and pp >= 1 and (self.max_pp is None or pp <= self.max_pp)

    def with_decode_overhead(self, ms: float) -> LatencyModel:
        if ms == 0:
            return self
        return replace(self, steps={tp: step.with_decode_overhead(ms) for tp, step in self.steps.items()},
                       source=f"{self.source} + {ms:g} ms per decode step")

    def kv_capacity(self, tp: int, pp: int) -> int:
        if (tp, pp) in self.capacity_table:
            return self.capacity_table[(tp, pp)]
        free = tp * pp * self.usable_bytes_per_gpu - self.weight_bytes
        return max(0, math.floor(free / self.kv_bytes_per_token))


# ---- fitting ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrefillSample:
    lengths: tuple[int, ...]
    seconds: float


@dataclass(frozen=True)
class DecodeSample:
    batch: int
    sum_ctx: int
    seconds: float


def _fit(features: np.ndarray, seconds: np.ndarray) -> tuple[Coeffs, FitError]:
    """Least squares in relative terms (each row scaled by 1/T), so short steps count as much as long."""
    if len(seconds) < 3:
        raise ValueError(f"need at least 3 samples to fit 3 coefficients, got {len(seconds)}")
    if np.any(seconds <= 0):
        raise ValueError("step times must be positive")
    ms = seconds * 1000.0
    scale = 1.0 / ms
    sol, *_ = np.linalg.lstsq(features * scale[:, None], np.ones_like(ms), rcond=None)
    rel = np.abs(features @ sol - ms) / ms
    return Coeffs(*map(float, sol)), FitError(len(ms), float(rel.mean()), float(rel.max()))


def fit_prefill(samples: Sequence[PrefillSample]) -> tuple[Coeffs, FitError]:
    feats = np.array([[1.0, sum(s.lengths), sum(x * x for x in s.lengths)] for s in samples])
    return _fit(feats.reshape(-1, 3), np.array([s.seconds for s in samples], dtype=float))


def fit_decode(samples: Sequence[DecodeSample]) -> tuple[Coeffs, FitError]:
    feats = np.array([[1.0, s.sum_ctx, s.batch] for s in samples], dtype=float)
    return _fit(feats.reshape(-1, 3), np.array([s.seconds for s in samples], dtype=float))


def fit_step_profile(prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample],
                     threshold: int = DEFAULT_THRESHOLD) -> StepProfile:
    """Fit all three step formulas. Without samples above ``threshold`` the large-batch fit is the small one."""
    p, p_err = fit_prefill(prefill)
    small_samples = [s for s in decode if s.batch <= threshold]
    large_samples = [s for s in decode if s.batch > threshold]
    small, small_err = fit_decode(small_samples)
    errors = {"prefill": p_err, "decoding_smallbs": small_err}
    large = small
    if len(large_samples) >= 3:
        large, errors["decoding_largebs"] = fit_decode(large_samples)
    return StepProfile(p, small, large, threshold, errors)


# ---- files -----------------------------------------------------------------------------------------

def _step_to_json(step: StepProfile) -> dict[str, Any]:
    out: dict[str, Any] = {
        "decoding_large_small_bs_threshold": step.threshold,
        "prefill": step.prefill.as_list(),
        "decoding_smallbs": step.decode_small.as_list(),
        "decoding_largebs": step.decode_large.as_list(),
    }
    if step.fit_error:
        out["fit_error"] = {k: vars(v) for k, v in step.fit_error.items()}
    return out


def _step_from_json(raw: Mapping[str, Any], where: str) -> StepProfile:
    try:
        coeffs = {k: Coeffs(*(float(x) for x in raw[k])) for k in ("prefill", "decoding_smallbs", "decoding_largebs")}
        errors = {k: FitError(**v) for k, v in raw.get("fit_error", {}).items()}
        threshold = int(raw.get("decoding_large_small_bs_threshold", DEFAULT_THRESHOLD))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad step profile ({e!r}); expected prefill/decoding_smallbs/"
                         "decoding_largebs lists of 3 numbers") from e
    return StepProfile(coeffs["prefill"], coeffs["decoding_smallbs"], coeffs["decoding_largebs"], threshold, errors)


def save_profiles(path: str | Path, models: Sequence[LatencyModel]) -> None:
    if not models:
        raise ValueError("nothing to save")
    hardware = {m.hardware for m in models}
    doc = {"format": FORMAT, "hardware": "/".join(sorted(hardware)), "models": {
        m.model: {
            "hardware": m.hardware,
            "source": m.source,
            "kv_bytes_per_token": m.kv_bytes_per_token,
            "usable_bytes_per_gpu": m.usable_bytes_per_gpu,
            "weight_bytes": m.weight_bytes,
            "max_pp": m.max_pp,
            "max_num_tokens": [[tp, pp, n] for (tp, pp), n in sorted(m.capacity_table.items())],
            "tp": {str(tp): _step_to_json(s) for tp, s in sorted(m.steps.items())},
        } for m in models}}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def load_profiles(path: str | Path) -> dict[str, LatencyModel]:
    """Every model in a profile file, by canonical model name.

    Reads our format, or the published DistServe format (``{model: {tp: {...}}}``) with its
    ``max_num_tokens.csv`` next to it for memory limits.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read profile {path}: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a profile file is a JSON object")
    if doc.get("format") == FORMAT:
        return {key: _model_from_json(key, raw, path) for key, raw in doc.get("models", {}).items()}
    return _load_reference(path, doc)


def _model_from_json(key: str, raw: Mapping[str, Any], path: Path) -> LatencyModel:
    where = f"{path} [{key}]"
    try:
        return LatencyModel(
            model=key,
            hardware=str(raw["hardware"]),
            source=str(raw.get("source", "file")),
            steps={int(tp): _step_from_json(s, where) for tp, s in raw["tp"].items()},
            kv_bytes_per_token=int(raw["kv_bytes_per_token"]),
            usable_bytes_per_gpu=float(raw["usable_bytes_per_gpu"]),
            weight_bytes=float(raw["weight_bytes"]),
            capacity_table={(int(tp), int(pp)): int(n) for tp, pp, n in raw.get("max_num_tokens", [])},
            max_pp=None if raw.get("max_pp") is None else int(raw["max_pp"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad model entry: {e}") from e


def _load_reference(path: Path, doc: Mapping[str, Any]) -> dict[str, LatencyModel]:
    hardware = path.name.removeprefix("profiler-").split(".")[0]
    engine = path.name.split(".")[-2] if path.name.count(".") >= 2 else "reference"
    tables = _read_capacity_csv(path.parent / "max_num_tokens.csv")
    models = {}
    for name, by_tp in doc.items():
        key = model_key(name)
        where = f"{path} [{name}]"
        if not isinstance(by_tp, dict):
            raise ValueError(f"{where}: expected {{tp: step profile}}")
        shape = model_shape(key)  # the reference format carries no shape: it must be a built-in model
        table = tables.get(key, {})
        usable, weights = _memory_from_table(table, shape.kv_bytes_per_token, shape.weight_bytes)
        models[key] = LatencyModel(
            model=key, hardware=hardware, source=f"reference:{engine}",
            steps={int(tp): _step_from_json(s, where) for tp, s in by_tp.items()},
            kv_bytes_per_token=shape.kv_bytes_per_token,
            usable_bytes_per_gpu=usable, weight_bytes=weights, capacity_table=table,
        )
    return models


def _read_capacity_csv(path: Path) -> dict[str, dict[tuple[int, int], int]]:
    if not path.exists():
        return {}
    tables: dict[str, dict[tuple[int, int], int]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            key = (int(row["tp"]), int(row["pp"]))
            tables.setdefault(model_key(row["model"]), {})[key] = int(row["max_num_tokens"])
    return tables


def _memory_from_table(table: Mapping[tuple[int, int], int], kv_bytes: int, weight_bytes: float
                       ) -> tuple[float, float]:
    """Usable bytes per GPU and weight bytes from a capacity table: tokens are linear in tp*pp."""
    if len(table) < 2:
        return 0.9 * 80 * 1024**3, float(weight_bytes)
    gpus = np.array([tp * pp for tp, pp in table], dtype=float)
    tokens = np.array(list(table.values()), dtype=float)
    slope, intercept = np.polyfit(gpus, tokens, 1)
    return float(slope * kv_bytes), float(-intercept * kv_bytes)


def reference_profiles(engine: str = "distserve") -> dict[str, LatencyModel]:
    """The published A100-80GB profiles shipped with the package: engine 'distserve' or 'vllm'."""
    if engine not in ("distserve", "vllm"):
        raise ValueError(f"reference engine must be 'distserve' or 'vllm', got {engine!r}")
    root = resources.files("services.planner") / "profiles"
    with resources.as_file(root) as folder:
        return load_profiles(Path(folder) / f"profiler-a100-80g.{engine}.json")

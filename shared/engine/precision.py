"""What an engine computes in when its settings say `auto`: the dtype and the linear weights, per CPU and phase.

Prefill is compute-bound: it wants the fastest matrix unit the CPU has (bfloat16 on AMX or AVX-512-BF16,
which run it 1.5-3x faster than float32). Decode is memory-bound: it wants the fewest bytes per weight
that a fast kernel reads. The table below is what `distserve bench engine` measured on each kind of CPU
(docs/performance.md, "Which variant runs by default"). A colocated engine runs both phases and takes the
decode choice, since most of its steps are decode steps. A setting given explicitly is kept; the other
follows it (`choose`).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shared.config import DType, Role, Weights

CpuKind = Literal["amx", "avx512-bf16", "avx512", "avx2", "baseline"]
Phase = Literal["prefill", "decode"]

# (dtype, weights) per CPU kind and phase.
CHOICES: dict[tuple[CpuKind, Phase], tuple[DType, Weights]] = {
    ("amx", "prefill"): ("bfloat16", "native"),
    ("amx", "decode"): ("float32", "fp16"),
    ("avx512-bf16", "prefill"): ("bfloat16", "native"),
    ("avx512-bf16", "decode"): ("float32", "fp16"),
    ("avx512", "prefill"): ("float32", "fp16"),
    ("avx512", "decode"): ("float32", "fp16"),
    ("avx2", "prefill"): ("float32", "fp16"),
    ("avx2", "decode"): ("float32", "fp16"),
    ("baseline", "prefill"): ("float32", "native"),
    ("baseline", "decode"): ("float32", "native"),
}


@dataclass(frozen=True)
class Precision:
    dtype: DType
    weights: Weights
    cpu: CpuKind
    chosen: bool  # False: both were given explicitly

    def describe(self) -> str:
        how = f"chosen for this {self.cpu} CPU" if self.chosen else "as configured"
        return f"dtype={self.dtype}, weights={self.weights} ({how})"


def kind_of(flags: frozenset[str]) -> CpuKind:
    """The CPU kind from its /proc/cpuinfo flags."""
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512-bf16"
    if "avx512f" in flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "baseline"


def _cpuinfo(field: str) -> str | None:
    """The first value of a /proc/cpuinfo field, e.g. "flags" or "model name" (None off Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.partition(":")[2].strip() for line in lines if line.split(":")[0].strip() == field), None)


@functools.cache
def cpu_kind() -> CpuKind:
    return kind_of(frozenset((_cpuinfo("flags") or "").split()))


def cpu_model() -> str:
    """The CPU's name, as benchmarks print it next to their numbers."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def choose(dtype: DType | Literal["auto"], weights: Weights | Literal["auto"], role: Role,
           cpu: CpuKind | None = None) -> Precision:
    """Concrete dtype and weights for an engine of `role`: auto settings from the table, the others kept.

    Only the weights given: float32 activations (what every converted weight runs with, and native weights
    stay exact). Only the dtype given: native weights for bfloat16; for float32, the table's weights where
    the table runs float32, else fp16."""
    cpu = cpu or cpu_kind()
    phase: Phase = "prefill" if role == "prefill" else "decode"
    table_dtype, table_weights = CHOICES[cpu, phase]
    if dtype == "auto" and weights == "auto":
        return Precision(table_dtype, table_weights, cpu, chosen=True)
    if dtype == "auto":
        assert weights != "auto"
        return Precision("float32", weights, cpu, chosen=True)
    if weights == "auto":
        if dtype == "bfloat16":
            return Precision(dtype, "native", cpu, chosen=True)
        return Precision(dtype, table_weights if table_dtype == "float32" else "fp16", cpu, chosen=True)
    return Precision(dtype, weights, cpu, chosen=False)

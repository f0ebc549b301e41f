"""`auto` dtype and weights: chosen per CPU kind and role; a setting given explicitly is kept."""

from __future__ import annotations

import pytest

from shared.engine import EngineConfig
from shared.engine.precision import CHOICES, choose, cpu_kind, kind_of

ZEN3 = ["fpu", "sse", "sse2", "avx", "avx2", "fma", "f16c", "bmi2"]
ZEN4 = [*ZEN3, "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"]
SAPPHIRE_RAPIDS = [*ZEN4, "amx_tile", "amx_bf16", "amx_int8"]


@pytest.mark.parametrize(("flags", "kind"), [(SAPPHIRE_RAPIDS, "amx"), (ZEN4, "avx512-bf16"),
                                             ([*ZEN3, "avx512f"], "avx512"), (ZEN3, "avx2"),
                                             (["sse2"], "baseline")])
def test_cpu_kinds_from_flags(flags: list[str], kind: str) -> None:
    assert kind_of(frozenset(flags)) == kind


def test_each_phase_gets_its_own_choice() -> None:
    assert (choose("auto", "auto", "prefill", "amx").dtype, choose("auto", "auto", "decode", "amx").dtype) == (
        "bfloat16", "float32")
    colocated = choose("auto", "auto", "colocated", "avx512-bf16")
    assert (colocated.dtype, colocated.weights) == CHOICES["avx512-bf16", "decode"]  # mostly decode steps
    assert choose("auto", "auto", "prefill", "baseline").weights == "native"  # no fast kernel without AVX2


def test_a_given_setting_is_kept_and_the_other_follows() -> None:
    p = choose("auto", "q4_1", "prefill", "amx")
    assert (p.dtype, p.weights, p.chosen) == ("float32", "q4_1", True)  # converted weights run float32
    assert choose("bfloat16", "auto", "decode", "avx2").weights == "native"
    assert choose("float32", "auto", "prefill", "amx").weights == "fp16"  # the table's bfloat16 refused
    p = choose("float32", "native", "prefill", "amx")
    assert (p.dtype, p.weights, p.chosen) == ("float32", "native", False)
    assert "as configured" in p.describe()


def test_engine_config_resolves_auto_for_this_cpu() -> None:
    for role in ("prefill", "decode", "colocated"):
        config = EngineConfig(role=role)
        expected = choose("auto", "auto", role)
        assert (config.dtype, config.weights, config.precision_chosen) == (expected.dtype, expected.weights, True)
    assert cpu_kind() in {kind for kind, _ in CHOICES}
    explicit = EngineConfig(dtype="float32", weights="native")
    assert (explicit.dtype, explicit.weights, explicit.precision_chosen) == ("float32", "native", False)
    with pytest.raises(ValueError, match="weights must be"):
        EngineConfig(weights="fp8")  # type: ignore[arg-type]

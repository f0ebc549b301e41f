"""Profile fitting recovers known coefficients; `distserve profile` measures the engine and `plan` uses it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.cli import main
from services.planner.latency import (
    Coeffs,
    DecodeSample,
    PrefillSample,
    StepProfile,
    fit_step_profile,
    load_profiles,
    save_profiles,
)
from services.planner.profiler import refit_to_steps
from tests.planner.conftest import toy_model

PREFILL, DECODE = Coeffs(12.0, 0.05, 2e-5), Coeffs(8.0, 0.0004, 0.09)


def samples(noise: float, seed: int = 0) -> tuple[list[PrefillSample], list[DecodeSample]]:
    rng = np.random.default_rng(seed)

    def jitter(ms: float) -> float:
        return ms / 1000 * (1 + noise * rng.standard_normal())

    prefill = [PrefillSample((n,) * b, jitter(PREFILL.ms(n * b, n * n * b)))
               for n in (32, 128, 512, 1024) for b in (1, 2, 4)]
    decode = [DecodeSample(b, b * c, jitter(DECODE.ms(b * c, b))) for b in (1, 4, 16, 64) for c in (64, 512, 2048)]
    return prefill, decode


def test_fit_recovers_exact_coefficients() -> None:
    step = fit_step_profile(*samples(noise=0.0))
    assert step.prefill.as_list() == pytest.approx(PREFILL.as_list(), rel=1e-6)
    assert step.decode_small.as_list() == pytest.approx(DECODE.as_list(), rel=1e-6)
    assert step.fit_error["prefill"].max_rel < 1e-9


def test_fit_with_noise_stays_close() -> None:
    step = fit_step_profile(*samples(noise=0.01))
    for n in (64, 700):  # predictions, not raw coefficients, are what the simulator uses
        assert step.prefill_time(n, n * n) == pytest.approx(PREFILL.ms(n, n * n) / 1000, rel=0.03)
    assert step.decode_time(32, 32 * 1000) == pytest.approx(DECODE.ms(32 * 1000, 32) / 1000, rel=0.03)
    assert 0 < step.fit_error["decoding_smallbs"].mean_rel < 0.03


TINY = 'random:{"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, ' \
       '"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "max_position_embeddings": 512}'


def test_profile_command_measures_the_engine_and_plan_loads_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    out = tmp_path / "tiny.json"
    rc = main(["profile", "--model", TINY, "--out", str(out), "--prefill-lengths", "16,64,128",
               "--prefill-batches", "1,2", "--decode-batches", "1,2,4", "--decode-contexts", "16,64",
               "--decode-steps", "2", "--repeats", "1", "--kv-cache-gib", "0.01", "--threads", "1"])
    assert rc == 0
    assert "mean relative error" in capsys.readouterr().out
    model = load_profiles(out)["random"]
    assert model.tp_degrees == [1] and model.max_pp == 1 and model.kv_capacity(1, 1) > 0
    step = model.step(1)
    assert step.prefill_time(128, 128 * 128) > step.prefill_time(16, 256) > 0

    rc = main(["plan", "--profile", str(out), "--model", "random", "--gpus-per-node", "4", "--workload",
               "fixed:64:8", "--ttft", "5", "--tpot", "1", "--rate", "1", "--num-requests", "100", "--json"])
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["prefill"]["pp"] == plan["decode"]["pp"] == 1  # a measured CPU profile cannot pipeline
    assert plan["attainment"] >= 0.9


def served_steps(step: StepProfile, seed: int = 0) -> dict[str, list[dict[str, object]]]:
    """steps.json as `bench compare` writes it, timed exactly by ``step`` (seconds)."""
    rng = np.random.default_rng(seed)
    prefill, decode = [], []
    for _ in range(40):
        lengths = [int(n) for n in rng.integers(5, 400, rng.integers(1, 4))]
        seconds = step.prefill_time(sum(lengths), sum(n * n for n in lengths))
        prefill.append({"ended": 1.0, "seconds": seconds, "prefill_lengths": lengths, "decode_batch": 0,
                        "decode_context": 0})
        batch = int(rng.integers(1, 60))
        ctx = int(batch * rng.integers(20, 500))
        decode.append({"ended": 1.0, "seconds": step.decode_time(batch, ctx), "prefill_lengths": [],
                       "decode_batch": batch, "decode_context": ctx})
    mixed = {"ended": 1.0, "seconds": 9.0, "prefill_lengths": [64], "decode_batch": 3, "decode_context": 90}
    return {"prefill:prefill-0": prefill, "decode:decode-0": decode + [mixed]}


def test_refit_recovers_the_step_times_the_stack_served(tmp_path: Path) -> None:
    base = toy_model(tps=(1,))
    served = StepProfile(Coeffs(30.0, 0.25, 4e-4), Coeffs(40.0, 0.006, 0.5), Coeffs(40.0, 0.006, 0.5))
    model = refit_to_steps(base, served_steps(served))
    step = model.steps[1]
    for got, want in ((step.prefill, served.prefill), (step.decode_small, served.decode_small)):
        assert got.as_list() == pytest.approx(want.as_list(), rel=1e-6)  # the mixed step was left out
    assert model.kv_bytes_per_token == base.kv_bytes_per_token and "refitted" in model.source
    with pytest.raises(ValueError, match="too few"):
        refit_to_steps(base, served_steps(served), workers=["prefill-0"])  # no decode steps among them

    save_profiles(tmp_path / "base.json", [base])
    (tmp_path / "steps.json").write_text(json.dumps(served_steps(served)))
    assert main(["profile", "--refit", str(tmp_path / "base.json"), "--steps", str(tmp_path / "steps.json"),
                 "--out", str(tmp_path / "refit.json")]) == 0
    (loaded,) = load_profiles(tmp_path / "refit.json").values()
    assert loaded.steps[1].prefill.as_list() == pytest.approx(served.prefill.as_list(), rel=1e-6)
    assert main(["profile", "--refit", str(tmp_path / "base.json"), "--out", str(tmp_path / "x.json")]) == 2

"""The emulated GPU engine: step times from the profile, the real scheduler and blocks, KV hand-off of a
fraction of the bytes plus modelled link time, and no torch anywhere on its path."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from services.planner.latency import Coeffs, StepProfile
from services.worker.emulation import ProfileStepTimes, emulated_gpu
from shared.config import load_settings
from shared.engine import EngineConfig, SamplingParams
from shared.engine.emulated import EmulatedEngine, EmulatedGPU
from shared.tokenizer import load_tokenizer

# Round numbers, so that every expected time below is computed by hand (milliseconds)
PROFILE = StepProfile(prefill=Coeffs(10, 0.1, 0.001), decode_small=Coeffs(5, 0.01, 1.0),
                      decode_large=Coeffs(50, 0.01, 0.5), threshold=8)
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


def gpu(pp: int = 1, capacity: int = 16_000) -> EmulatedGPU:
    return EmulatedGPU(label="emulated-test", model_name="toy", times=ProfileStepTimes(PROFILE, pp), pp=pp,
                       kv_capacity_tokens=capacity, kv_bytes_per_token=1024, kv_fraction=1 / 64,
                       link_bytes_per_s=1e9)


def engine(role: str = "colocated", pp: int = 1, **config: object) -> EmulatedEngine:
    return EmulatedEngine(EngineConfig(role=role, pp=pp, **config), gpu(pp), load_tokenizer("default"))  # type: ignore[arg-type]


def test_step_times_are_the_profiles_for_hand_computed_batches() -> None:
    times = ProfileStepTimes(PROFILE, pp=1)
    assert times.prefill([100, 200]) == pytest.approx((10 + 0.1 * 300 + 0.001 * (100**2 + 200**2)) / 1000)
    assert times.decode(4, 1000) == pytest.approx((5 + 0.01 * 1000 + 1.0 * 4) / 1000)
    assert times.decode(20, 1000) == pytest.approx((50 + 0.01 * 1000 + 0.5 * 20) / 1000)  # the large-batch fit
    # Two stages: 2 micro-batches of 2, each stage 1/2 of the work (batch.py's round)
    assert ProfileStepTimes(PROFILE, pp=2).decode(4, 1000) == pytest.approx((5 + (0.01 * 1000 + 1.0 * 4) / 2) / 1000)


def test_an_emulated_step_takes_its_modelled_time_and_emits_placeholders() -> None:
    e = engine()
    e.add_request("a", list(range(100, 400)), PARAMS)  # 300 tokens
    e.add_request("b", list(range(100, 200)), PARAMS)  # 100
    scheduled = e.scheduler.schedule()
    expected = (10 + 0.1 * 400 + 0.001 * (300**2 + 100**2)) / 1000
    assert e.step_seconds(scheduled) == pytest.approx(expected)
    # (scheduling only reserved their blocks: the step below schedules the same batch)
    texts: dict[str, str] = {}
    while e.has_unfinished():
        for out in e.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
    (prefill, *decodes) = e.take_step_records()
    assert prefill.prefill_lengths == (300, 100) and prefill.seconds >= expected
    assert decodes[0].decode_batch == 2 and decodes[0].seconds >= (5 + 0.01 * (301 + 101) + 2) / 1000
    assert texts["a"] == texts["b"] == " Emulated tokens:"  # the same placeholder text for every request
    assert e.stats().free_blocks == e.stats().total_blocks


def test_a_pipelined_prefill_worker_starts_a_batch_whenever_stage_one_is_free() -> None:
    """Three batches through 3 stages: they land at T, 4T/3 and 5T/3, not at T, 2T, 3T."""
    e = engine("prefill", pp=3, max_num_batched_tokens=1000)
    lengths = [1000, 1000, 1000]
    seconds = ProfileStepTimes(PROFILE, 3).prefill([1000])  # 1.11 s
    started = time.perf_counter()
    for i, n in enumerate(lengths):
        e.add_request(f"r{i}", [100] * n, PARAMS)
    landed = []
    while len(landed) < 3:
        outputs = e.step()
        landed += [(out.request_id, time.perf_counter() - started) for out in outputs]
        if len(landed) == 1:
            assert e.stats().num_waiting == 2 and e.stats().queued_prompt_tokens == 2000  # in the pipeline
    assert [rid for rid, _ in landed] == ["r0", "r1", "r2"]
    assert landed[0][1] >= seconds and landed[2][1] >= seconds * 5 / 3
    assert landed[2][1] < seconds * 3  # one batch at a time would take 3T
    assert sorted(e.held) == ["r0", "r1", "r2"]


def test_an_abort_in_the_pipeline_frees_the_request_when_its_batch_lands() -> None:
    e = engine("prefill", pp=2)
    e.add_request("gone", [100] * 50, PARAMS)
    e.add_request("kept", [100] * 50, PARAMS)
    with e.lock:
        e._launch(time.perf_counter())
    assert e.abort("gone") and "gone" in e.sequences
    outputs = e.step()
    assert [o.request_id for o in outputs] == ["kept"]
    assert "gone" not in e.sequences and list(e.held) == ["kept"]


def test_only_a_request_that_has_not_started_can_be_withdrawn() -> None:
    e = engine("prefill", max_num_batched_tokens=64)
    e.add_request("first", [100] * 50, PARAMS)
    e.add_request("second", [100] * 50, PARAMS)  # beyond the first batch's token budget: it waits
    blocks = e.stats().free_blocks
    assert [o.request_id for o in e.step()] == ["first"]
    assert not e.withdraw("first")  # computed (its KV is held for decode)
    assert e.withdraw("second") and "second" not in e.sequences
    assert not e.withdraw("second") and not e.has_unfinished()
    e.release("first")
    assert e.stats().free_blocks == blocks


def test_kv_moves_as_a_fraction_of_its_bytes_plus_modelled_link_time() -> None:
    prefill, decode = engine("prefill"), engine("decode")
    prompt = list(range(100, 200))
    prefill.add_request("r", prompt, PARAMS)
    (first,) = prefill.step()
    export = prefill.kv_export("r")
    assert export.meta.block_nbytes == 16 * 1024 // 64 and export.meta.dtype == "emulated"
    export.views[0][:] = 7
    dest = decode.kv_import_begin(export.meta)
    assert dest is not None and dest.heads is None and sum(v.nbytes for v in dest.views) == export.nbytes
    np.concatenate([v.reshape(-1) for v in dest.views])[:] = 7  # what a pull writes
    assert decode.modelled_transfer_s(export.meta) == pytest.approx(100 * 1024 * (1 - 1 / 64) / 1e9)
    decode.kv_import_commit("r")
    texts = first.text
    while decode.has_unfinished():
        texts += "".join(o.text for o in decode.step())
    assert texts == " Emulated tokens:"  # continued where prefill stopped


def test_a_torch_engine_refuses_emulated_kv_and_the_emulator_refuses_real_kv() -> None:
    e = engine("decode")
    prefill = engine("prefill")
    prefill.add_request("r", list(range(100, 120)), PARAMS)
    prefill.step()
    meta = prefill.kv_export("r").meta
    with pytest.raises(ValueError, match="layout mismatch"):
        e.kv_import_begin(meta.model_copy(update={"dtype": "float32"}))


def test_emulated_gpu_from_the_reference_profile() -> None:
    settings = load_settings({"engine": "emulated", "model": "opt-13b", "prefill": {"pp": 3}})
    g = emulated_gpu(EngineConfig(role="prefill", pp=3), settings)
    assert g.label == "emulated-a100" and g.model_name == "opt-13b"
    assert g.kv_bytes_per_token == 2 * 40 * 5120 * 2  # OPT-13B, fp16
    with pytest.raises(ValueError, match="tp=3"):
        emulated_gpu(EngineConfig(role="decode", tp=3), settings)
    with pytest.raises(ValueError, match="roofline"):
        emulated_gpu(EngineConfig(role="decode"), load_settings({"engine": "emulated", "model": "opt-13b",
                                                                  "emulation": {"gpu": "h100"}}))


def test_settings_refuse_parallelism_the_torch_engine_cannot_run() -> None:
    with pytest.raises(ValueError, match="emulated engine"):
        load_settings({"decode": {"pp": 2}})
    assert load_settings({"decode": {"tp": 2}}).decode.tp == 2  # the torch engine's ranks
    assert load_settings({"engine": "emulated", "decode": {"tp": 2, "pp": 2}}).decode.pp == 2


def test_the_emulated_path_never_imports_torch() -> None:
    """A worker's command line, settings, engine, transports and hand-off: no torch loaded."""
    code = """
import sys
from services.cli import build_parser
from services.worker.base import Worker
from services.worker.kv_handoff import KVReceiver
from services.worker.emulation import emulated_engine
from shared.config import load_settings
from shared.engine import EngineConfig, SamplingParams
from shared.transfer import create_transport
build_parser(with_bench=False).parse_args(["decode", "--engine", "emulated", "--model", "opt-13b"])
settings = load_settings({"engine": "emulated", "model": "opt-13b"})
e = emulated_engine(EngineConfig(role="colocated"), settings)
e.add_request("r", [100] * 10, SamplingParams(max_tokens=2, ignore_eos=True))
while e.has_unfinished():
    e.step()
create_transport("tcp")
assert "torch" not in sys.modules, "torch was imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

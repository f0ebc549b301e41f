"""`device` auto | cpu | cuda: its resolution and errors here, and the engine on a GPU where one is lent.

The GPU tests take their model from $DISTSERVE_GPU_TEST_MODEL (deploy/gpu/check.sh: random weights with
the default tokenizer, since the GPU machine cannot carry the default model's weights), else the default.
"""

from __future__ import annotations

import os

import pytest
import torch
from pydantic import ValidationError

from shared.config import EngineSettings
from shared.engine import EngineConfig, LLMEngine
from shared.engine.device import on_device, resolve_device
from shared.engine.perplexity import score
from tests.engine.conftest import make_engine, run_to_completion
from tests.engine.test_generation import GREEDY, PROMPTS

GPU_TEST_MODEL = os.environ.get("DISTSERVE_GPU_TEST_MODEL", "default")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a GPU")


@no_gpu
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    assert resolve_device("auto") == resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device=cuda, but torch .* sees no CUDA GPU; use device=cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="sees no CUDA GPU"):  # before any weight loads
        LLMEngine(EngineConfig(device="cuda"))


def test_bad_device_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="device"):
        EngineSettings(device="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        resolve_device("tpu")


def test_a_gpu_gets_a_gpu_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """What runs on a GPU, decided before any CUDA call (torch.cuda.is_available stands in for a GPU here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen = on_device(EngineConfig(role="decode"))  # auto: the CPU table's choice is replaced
    assert (chosen.device, chosen.dtype, chosen.weights) == ("cuda", "bfloat16", "native")
    kept = on_device(EngineConfig(dtype="float32", weights="native"))
    assert (kept.device, kept.dtype, kept.weights) == ("cuda", "float32", "native")
    with pytest.raises(ValueError, match="weights=fp16 is a CPU format"):
        on_device(EngineConfig(dtype="float32", weights="fp16"))
    with pytest.raises(ValueError, match="compiled decode graphs are CPU graphs"):
        on_device(EngineConfig(compile=True))
    assert on_device(EngineConfig(device="cpu")).device == "cpu"


def test_the_engine_says_where_it_computes() -> None:
    engine = make_engine(model=GPU_TEST_MODEL, device="cpu")
    assert engine.config.device == "cpu" and engine.label == "torch-cpu" and not engine.cache.data.is_cuda


@needs_gpu
def test_a_gpu_engine_computes_what_the_cpu_engine_does() -> None:
    """The same weights in float32 on both: the same perplexity and next-token predictions on a text."""
    cpu, gpu = (make_engine(model=GPU_TEST_MODEL, device=device, dtype="float32", weights="native")
                for device in ("cpu", "cuda"))
    gpu.model.load_state_dict(cpu.model.state_dict())  # random weights are drawn on each device: the CPU's
    assert gpu.cache.data.is_cuda and gpu.label == "torch-cuda" and gpu.model.paged_attention is not None
    tokens = cpu.tokenizer.encode(" ".join(PROMPTS))[:96]
    on_cpu, on_gpu = score(cpu.model, tokens, torch.float32), score(gpu.model, tokens, torch.float32)
    assert on_gpu.perplexity == pytest.approx(on_cpu.perplexity, rel=1e-3)
    assert on_gpu.agreement(on_cpu) >= 0.95
    for i, prompt in enumerate(PROMPTS):  # batched decode through the Triton kernel, prefills through SDPA
        gpu.add_request(str(i), gpu.tokenizer.encode(prompt), GREEDY)
    assert all(len(t) == GREEDY.max_tokens for t in run_to_completion(gpu).values())

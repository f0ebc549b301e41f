"""fp16 and int8 linear weights (shared/engine/quant.py) stay close to fp32 on the real model."""

from __future__ import annotations

import copy

import pytest
import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.engine.config import Weights
from shared.engine.loader import load_model
from shared.engine.model import Transformer
from shared.engine.quant import (
    Fp16Linear,
    Int8Linear,
    PackedBf16Linear,
    can_pack_bf16,
    convert_linears_,
    pack_bf16_linears_,
)
from shared.tokenizer import load_tokenizer
from tests.engine.conftest import run_to_completion
from tests.engine.test_reference import our_logits

TEXT = ("Paris is the capital of France. Berlin is the capital of Germany. The quick brown fox jumps over the "
        "lazy dog. def fibonacci(n): return n if n < 2 else")


@pytest.fixture(scope="module")
def fp32_model() -> Transformer:
    return load_model("default")


@pytest.mark.parametrize(("weights", "max_rel_error", "min_top1"), [("fp16", 2e-3, 0.9), ("int8", 0.1, 0.8)])
def test_logits_stay_close_to_fp32(fp32_model: Transformer, weights: Weights, max_rel_error: float,
                                   min_top1: float) -> None:
    ids = load_tokenizer("default").encode(TEXT)
    assert len(ids) <= 40  # our_logits' cache holds 40 tokens
    reference = torch.cat(our_logits(fp32_model, ids[:-5], ids[-5:]))  # prefill, then 5 decode steps
    model = copy.deepcopy(fp32_model)
    convert_linears_(model, weights)  # type: ignore[arg-type]
    assert isinstance(model.lm_head, Fp16Linear if weights == "fp16" else Int8Linear)
    got = torch.cat(our_logits(model, ids[:-5], ids[-5:]))
    assert (got - reference).abs().max() <= max_rel_error * reference.abs().max()
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= min_top1


def test_fp16_engine_answers_and_batches_like_one_at_a_time() -> None:
    engine = LLMEngine(EngineConfig(kv_cache_memory_gib=0.25, weights="fp16"))
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True)
    prompts = [engine.tokenizer.encode(chat), engine.tokenizer.encode(TEXT)]
    params = SamplingParams(max_tokens=12, temperature=0)
    alone = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"alone{i}", prompt, params)
        alone.append(run_to_completion(engine)[f"alone{i}"])
    for i, prompt in enumerate(prompts):
        engine.add_request(f"batched{i}", prompt, params)
    batched = run_to_completion(engine)
    assert "Paris" in engine.tokenizer.decode(alone[0])
    assert [batched[f"batched{i}"] for i in range(len(prompts))] == alone


def test_packed_weights_need_float32() -> None:
    with pytest.raises(ValueError, match="float32"):
        EngineConfig(weights="fp16", dtype="bfloat16")
    with pytest.raises(ValueError, match="weights must be"):
        EngineConfig(weights="fp8")  # type: ignore[arg-type]



needs_bf16_kernels = pytest.mark.skipif(not can_pack_bf16(), reason="this CPU has no oneDNN bfloat16 kernels")


@needs_bf16_kernels
def test_packed_bf16_linears_give_the_plain_logits(fp32_model: Transformer) -> None:
    ids = load_tokenizer("default").encode(TEXT)
    plain = copy.deepcopy(fp32_model).to(torch.bfloat16)
    packed = copy.deepcopy(plain)
    pack_bf16_linears_(packed, keep_plain=False)
    assert isinstance(packed.lm_head, PackedBf16Linear) and packed.lm_head.weight is None
    reference = torch.cat(our_logits(plain, ids[:-5], ids[-5:], torch.bfloat16))
    got = torch.cat(our_logits(packed, ids[:-5], ids[-5:], torch.bfloat16))
    assert (got.float() - reference.float()).abs().max() <= 1e-2 * reference.float().abs().max()
    assert torch.equal(got.argmax(-1), reference.argmax(-1))


@needs_bf16_kernels
def test_bf16_engine_packs_its_weights_and_keeps_its_tokens() -> None:
    prompt = load_tokenizer("default").encode(TEXT)
    params = SamplingParams(max_tokens=8, temperature=0)
    tokens = []
    for pack in (False, True):
        engine = LLMEngine(EngineConfig(kv_cache_memory_gib=0.05, dtype="bfloat16", weights="native", pack_bf16=pack))
        assert isinstance(engine.model.lm_head, PackedBf16Linear) == pack
        engine.add_request("r", prompt, params)
        tokens.append(run_to_completion(engine)["r"])
    assert tokens[0] == tokens[1]

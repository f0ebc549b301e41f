"""GGUF block formats (q4_1, q8_0) in the fused kernel: every instruction set's path computes what the
widened weight computes, a GGUF model's weights survive requantization bit for bit, and the default
model in q4_1 answers as its fp32 weights do."""

from __future__ import annotations

import functools

import pytest
import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.engine.loader import load_model
from shared.engine.native import load_op_library
from shared.engine.quant import (
    BlockFormat,
    BlockQuantLinear,
    convert_linears_,
    dequantize_blocks,
    load_block_ops,
    quantize_blocks,
    register_block_fakes,
)
from tests.engine.conftest import run_to_completion

# Each instruction set's path, built on this machine under its own op namespace. A path the CPU lacks
# builds down to the next one (the test then checks that path twice).
VARIANTS = {"distserve": (), "distserve_avx2": ("-mno-avx512f",), "distserve_scalar": ("-mno-avx",)}


@functools.cache
def ops(namespace: str) -> object:
    if namespace == "distserve":
        load_block_ops()
    else:
        load_op_library("quant_linear", (*VARIANTS[namespace], f"-DDISTSERVE_NS={namespace}"))
        register_block_fakes(namespace)
    return getattr(torch.ops, namespace)


@pytest.mark.parametrize("namespace", list(VARIANTS))
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_every_path_computes_the_widened_weight(namespace: str, fmt: BlockFormat) -> None:
    op = ops(namespace)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(70, 96, generator=gen)  # output features not a multiple of any tile
    blocks = quantize_blocks(w, fmt)
    widened = dequantize_blocks(blocks, fmt)
    assert (widened - w).abs().max() <= (0.6 if fmt == "q4_1" else 0.03) * w.abs().max()
    for rows in (1, 3, 8, 13, 64):
        x = torch.randn(rows, 96, generator=gen)
        if fmt == "q4_1":
            y = op.q4_1_linear(x, blocks["qs"], blocks["d"], blocks["m"])  # type: ignore[attr-defined]
        else:
            y = op.q8_0_linear(x, blocks["qs"], blocks["d"])  # type: ignore[attr-defined]
        torch.testing.assert_close(y, x @ widened.T, rtol=1e-5, atol=1e-4)


def test_bad_shapes_are_refused() -> None:
    blocks = quantize_blocks(torch.randn(8, 64), "q4_1")
    with pytest.raises(RuntimeError, match="disagree"):
        torch.ops.distserve.q4_1_linear(torch.randn(2, 32), blocks["qs"], blocks["d"], blocks["m"])
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_blocks(torch.randn(8, 40), "q8_0")


def test_the_default_models_gguf_weights_survive_requantization() -> None:
    """Its file stores q4_1 layers and a q8_0 embedding (the tied LM head): our blocks are its blocks."""
    model = load_model("default")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            fmt: BlockFormat = "q8_0" if name == "lm_head" else "q4_1"
            w = module.weight.detach()
            assert torch.allclose(dequantize_blocks(quantize_blocks(w, fmt), fmt), w, rtol=0, atol=1e-6), name


def test_q4_1_engine_answers_as_the_fp32_weights_do() -> None:
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
    params = SamplingParams(max_tokens=16, temperature=0)
    answers = {}
    for weights in ("native", "q4_1"):
        engine = LLMEngine(EngineConfig(kv_cache_memory_gib=0.1, weights=weights))  # type: ignore[arg-type]
        if weights == "q4_1":
            assert isinstance(engine.model.layers[0].mlp.down_proj, BlockQuantLinear)
            assert engine.model.lm_head.fmt == "q8_0"  # type: ignore[union-attr]
        for i, text in enumerate(prompts):  # together: decode steps of several rows
            chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])
            engine.add_request(str(i), engine.tokenizer.encode(chat), params)
        answers[weights] = run_to_completion(engine)
    assert answers["q4_1"] == answers["native"]


def test_prefill_beyond_the_kernels_rows_widens_the_weight() -> None:
    linear = torch.nn.Linear(64, 48)
    layer = BlockQuantLinear(linear, "q4_1")
    x = torch.randn(100, 64)  # more rows than the fused kernel takes
    expected = x @ dequantize_blocks({"qs": layer.qs, "d": layer.d, "m": layer.m}, "q4_1").T + linear.bias
    torch.testing.assert_close(layer(x), expected.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer(x[:5]), expected[:5].detach(), rtol=1e-5, atol=1e-4)


def test_converting_a_model_keeps_the_lm_head_at_8_bits() -> None:
    model = load_model('random:{"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_layers": 1, '
                       '"num_heads": 4, "num_kv_heads": 2, "head_dim": 16}')
    convert_linears_(model, "q4_1")
    assert [m.fmt for m in model.modules() if isinstance(m, BlockQuantLinear)] == ["q4_1"] * 4 + ["q8_0"]

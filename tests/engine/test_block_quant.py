"""GGUF block formats (q4_1, q8_0) in the fused kernel: every instruction set's path computes the widened
weight times the activations quantized as the kernel quantizes them, a GGUF model's weights survive
requantization bit for bit, and the default model in q4_1 keeps its perplexity and its answers."""

from __future__ import annotations

import functools

import pytest
import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.engine.loader import load_model
from shared.engine.native import load_op_library
from shared.engine.perplexity import reference_tokens, score
from shared.engine.quant import (
    BLOCK,
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


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: per block of 32, round(x / dx) * dx with dx = max |x| / 127."""
    blocks = x.reshape(x.shape[0], -1, BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))  # in float32, as the kernel computes it
    return (torch.round(blocks * inv) * (amax / 127)).reshape(x.shape)


def test_the_isa_is_named() -> None:
    assert ops("distserve").quant_linear_isa() in ("vnni", "avx2", "scalar")  # type: ignore[attr-defined]
    assert ops("distserve_scalar").quant_linear_isa() == "scalar"  # type: ignore[attr-defined]


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
        torch.testing.assert_close(y, quantized_activations(x) @ widened.T, rtol=1e-5, atol=1e-4)
        assert (y - x @ widened.T).abs().max() < 0.05 * (x @ widened.T).abs().max()  # and close to the float product


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


def test_q4_1_engine_keeps_the_models_quality() -> None:
    """Perplexity on the reference text within 2% of the fp32 weights', the same greedy token at >= 95% of its
    positions (docs/performance.md states the measured loss), and the engine still answers a plain question."""
    scores = {}
    for weights in ("native", "q4_1"):
        engine = LLMEngine(EngineConfig(kv_cache_memory_gib=0.05, weights=weights))
        scores[weights] = score(engine.model, reference_tokens(engine.tokenizer, 512), torch.float32)
    layers = [m for m in engine.model.modules() if isinstance(m, BlockQuantLinear)]
    assert [m.fmt for m in layers] == ["q4_1"] * (len(layers) - 1) + ["q8_0"]  # the LM head last
    assert scores["native"].perplexity < scores["q4_1"].perplexity < 1.02 * scores["native"].perplexity
    assert scores["q4_1"].agreement(scores["native"]) >= 0.95
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": "List three prime numbers."}])
    engine.add_request("0", engine.tokenizer.encode(chat), SamplingParams(max_tokens=16, temperature=0))
    answer = engine.tokenizer.decode(run_to_completion(engine)["0"])
    assert "2" in answer and "3" in answer, answer


def test_prefill_beyond_the_kernels_rows_widens_the_weight() -> None:
    linear = torch.nn.Linear(64, 48)
    layer = BlockQuantLinear(linear, "q4_1")
    x = torch.randn(100, 64)  # more rows than the fused kernel takes
    widened = layer.dequantized()
    torch.testing.assert_close(layer(x), (x @ widened.T + linear.bias).detach(), rtol=1e-5, atol=1e-4)
    fused = quantized_activations(x[:5]) @ widened.T + linear.bias  # a decode step's rows: the fused kernel
    torch.testing.assert_close(layer(x[:5]), fused.detach(), rtol=1e-5, atol=1e-4)


def test_converting_a_model_keeps_the_lm_head_at_8_bits() -> None:
    model = load_model('random:{"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_layers": 1, '
                       '"num_heads": 4, "num_kv_heads": 2, "head_dim": 16}')
    convert_linears_(model, "q4_1")
    assert [m.fmt for m in model.modules() if isinstance(m, BlockQuantLinear)] == ["q4_1"] * 4 + ["q8_0"]

"""The Triton kernels (shared/engine/gpu/) against their torch references, under Triton's interpreter on
CPU (small shapes: the interpreter runs each program in numpy), and the paged attention kernel against
the engine's own decode attention paths too. With TRITON_INTERPRET=0 and a GPU (deploy/gpu/check.sh) the
same tests run compiled on the GPU."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined: CPU tensors, numpy programs
pytest.importorskip("triton")
ON_GPU = os.environ["TRITON_INTERPRET"] == "0"
if ON_GPU and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 compiles the kernels for a GPU: torch sees none here", allow_module_level=True)
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def on(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inputs, made on the CPU (seeded), on the device the kernels run on."""
    return tuple(t.to(DEVICE) for t in tensors)

from shared.engine.gpu import paged_attention, prefill_attention, rms_norm  # noqa: E402
from shared.engine.gpu import rope as gpu_rope  # noqa: E402


def paged_case(seed: int, dtype: torch.dtype, lens: tuple[int, ...] = (1, 5, 11)) -> tuple[torch.Tensor, ...]:
    """Three sequences (1, 5 and 11 tokens by default) in a shuffled pool of 4-token blocks, at most 3 blocks
    each, 6 query heads on 2 KV heads."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks, layers, block_size, kv_heads, head_dim = 12, 2, 4, 2, 16
    cache = torch.randn(num_blocks, layers, 2, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(3, 3, dtype=torch.int64)
    tables[0, :1], tables[1, :2], tables[2, :3] = order[:1], order[1:3], order[3:6]
    q = torch.randn(3, 6, head_dim, generator=gen).to(dtype)
    return q, cache, tables, torch.tensor(lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lens", [(1, 5, 11), (4, 8, 12)])  # inside blocks; on block boundaries, the maximum
def test_paged_decode_attention_matches_the_reference(dtype: torch.dtype, lens: tuple[int, ...]) -> None:
    q, cache, tables, lens_t = on(*paged_case(0, dtype, lens))
    scale = q.shape[-1] ** -0.5
    for layer in (0, 1):
        got = paged_attention.paged_decode_attention(q, cache, layer, tables, lens_t, scale)
        want = paged_attention.reference(q, cache, layer, tables, lens_t, scale)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_paged_decode_attention_matches_the_engines_gather_and_sdpa_path() -> None:
    q, cache, tables, lens = on(*paged_case(1, torch.float32))
    layer, scale = 1, q.shape[-1] ** -0.5
    kv_heads, block_size = cache.shape[4], cache.shape[3]
    k = cache[tables, layer, 0].reshape(3, -1, kv_heads, q.shape[2])  # what KVCache.gather returns
    v = cache[tables, layer, 1].reshape(3, -1, kv_heads, q.shape[2])
    mask = (torch.arange(tables.shape[1] * block_size, device=DEVICE)[None, :] < lens[:, None])[:, None, None, :]
    qg = q.view(3, kv_heads, q.shape[1] // kv_heads, q.shape[2])
    want = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).reshape(q.shape)
    got = paged_attention.paged_decode_attention(q, cache, layer, tables, lens, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_paged_decode_attention_rejects_shapes_it_cannot_run() -> None:
    q, cache, tables, lens = on(*paged_case(2, torch.float32))
    with pytest.raises(ValueError, match="does not fit"):
        paged_attention.paged_decode_attention(q[:, :5], cache, 0, tables, lens, 1.0)


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    x, weight, extra = on(torch.randn(5, 40, generator=gen), torch.randn(40, generator=gen),
                          torch.randn(5, 40, generator=gen))
    residual = extra if with_residual else None
    summed = x + residual if residual is not None else x
    want = F.rms_norm(summed, (40,), weight, 1e-5)
    got = rms_norm.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if residual is not None:
        torch.testing.assert_close(residual, summed)  # updated in place: the next layer's residual stream


def packed_prompts(seed: int) -> tuple[torch.Tensor, ...]:
    """Prompts of 1, 19 and 33 tokens packed in one batch (tiles split inside and across them)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.tensor([0, 1, 20, 53])
    q = torch.randn(53, 6, 16, generator=gen)
    kv = torch.randn(53, 2, 2, 16, generator=gen)  # K and V interleaved, as the engine's qkv split leaves them
    return on(q, kv[:, 0], kv[:, 1], starts)


def test_prefill_attention_over_packed_prompts_matches_the_reference_and_sdpa() -> None:
    q, k, v, starts = packed_prompts(4)
    scale = 16 ** -0.5
    got = prefill_attention.prefill_attention(q, k, v, starts, scale)
    torch.testing.assert_close(got, prefill_attention.reference(q, k, v, starts, scale), atol=1e-5, rtol=1e-5)
    a, b = 20, 53  # the engine's own path for one fresh prompt
    want = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None],
                                          v[a:b].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got[a:b], want[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_store_kv_writes_each_token_into_its_slot() -> None:
    _, k, v, _ = packed_prompts(5)
    cache = torch.zeros(20, 2, 2, 4, 2, 16, device=DEVICE)
    (slots,) = on(torch.randperm(80, generator=torch.Generator().manual_seed(6))[:53])
    prefill_attention.store_kv(k, v, cache, 1, slots)
    blocks, offsets = slots // 4, slots % 4
    torch.testing.assert_close(cache[blocks, 1, 0, offsets], k)
    torch.testing.assert_close(cache[blocks, 1, 1, offsets], v)
    assert cache[:, 0].abs().sum() == 0  # the other layer untouched


def test_rope_matches_the_engines_apply_rope() -> None:
    from shared.engine.model import RotaryEmbedding, apply_rope_

    rotary = RotaryEmbedding(16, 64, 10000.0)
    cos, sin, qkv = on(*rotary.tables(torch.tensor([0, 3, 7, 40, 41]), torch.float32),
                       torch.randn(5, 8 + 2 * 2, 16, generator=torch.Generator().manual_seed(7)))  # q 8, k 2, v 2
    heads = qkv[:, :10]  # q and k, a strided view as in the engine
    want = heads.clone()
    apply_rope_(want, cos, sin)
    before_v = qkv[:, 10:].clone()
    gpu_rope.rope_(heads, cos, sin)
    torch.testing.assert_close(qkv[:, :10], want, atol=1e-6, rtol=1e-6)
    assert torch.equal(qkv[:, 10:], before_v)  # v untouched


@pytest.mark.skipif(ON_GPU, reason="the engine on CPU: tests/engine/test_device.py runs it on the GPU")
def test_the_engine_decodes_through_the_triton_kernel_as_through_gather_and_sdpa() -> None:
    """The decode attention the engine runs on a GPU (Transformer.use_paged_attention), in the engine's own
    decode step on CPU under the interpreter: the logits of gather + SDPA."""
    from tests.engine.test_paged_attention import decode_step

    engine, batch = decode_step()
    want = engine.model(batch, engine.cache)  # gather + SDPA; each call writes the same K/V
    engine.model.paged_attention = paged_attention.paged_decode_attention
    torch.testing.assert_close(engine.model(batch, engine.cache), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(ON_GPU, reason="the engine on CPU: tests/engine/test_device.py runs it on the GPU")
def test_the_engine_prefills_fresh_prompts_through_one_packed_kernel_call() -> None:
    """The prefill attention the engine runs on a GPU (Transformer.use_packed_prefill): the logits of SDPA
    per prompt, for a batch of fresh prompts and for one where they join running decodes."""
    from shared.engine import EngineConfig, LLMEngine, SamplingParams
    from tests.engine.test_paged_attention import TINY

    engine = LLMEngine(EngineConfig(model=TINY, block_size=4, kv_cache_memory_gib=0.01, weights="native"))
    params = SamplingParams(max_tokens=8)

    def compare() -> int:
        batch, _ = engine.runner.prepare(engine.scheduler.schedule())
        engine.model.packed_prefill = None
        want = engine.model(batch, engine.cache)  # SDPA per prompt; each call writes the same K/V
        engine.model.use_packed_prefill()
        torch.testing.assert_close(engine.model(batch, engine.cache), want, atol=1e-5, rtol=1e-5)
        engine.model.packed_prefill = None
        return batch.num_decode

    for i, n in enumerate([2, 17, 70]):  # 70: two of the engine's 64-row tiles (a 1-token prompt rides as a decode)
        engine.add_request(f"r{i}", [(5 * j + i) % 250 + 3 for j in range(n)], params)
    assert compare() == 0
    engine = LLMEngine(EngineConfig(model=TINY, block_size=4, kv_cache_memory_gib=0.01, weights="native",
                                    chunked_prefill=True))  # prompts join the decodes of running requests
    engine.add_request("running", list(range(3, 12)), params)
    engine.step()
    for i, n in enumerate([6, 23]):
        engine.add_request(f"new{i}", [(3 * j + i) % 250 + 3 for j in range(n)], params)
    assert compare() == 1  # the running request's decode token first, then the two prompts


@pytest.mark.skipif(ON_GPU, reason="the engine on CPU: tests/engine/test_device.py runs it on the GPU")
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_the_engine_computes_the_same_with_the_triton_layer_ops(kind: str) -> None:
    """RMSNorm fused with the residual add, RoPE and the K/V store as the engine runs them on a GPU
    (Transformer.use_triton_layer_ops), in its own steps on CPU under the interpreter: the logits and the
    K/V of its CPU ops."""
    from shared.engine import EngineConfig, LLMEngine, SamplingParams
    from tests.engine.test_paged_attention import TINY, decode_step

    if kind == "decode":
        engine, batch = decode_step()
    else:
        engine = LLMEngine(EngineConfig(model=TINY, block_size=4, kv_cache_memory_gib=0.01, weights="native"))
        for i, n in enumerate([3, 9, 21]):
            engine.add_request(f"r{i}", [(7 * j + i) % 250 + 3 for j in range(n)], SamplingParams(max_tokens=4))
        batch, _ = engine.runner.prepare(engine.scheduler.schedule())
        assert len(batch.prefill_spans) == 3
    before = engine.cache.data.clone()
    want = engine.model(batch, engine.cache)
    written = engine.cache.data.clone()
    engine.cache.data.copy_(before)
    engine.model.use_triton_layer_ops()
    torch.testing.assert_close(engine.model(batch, engine.cache), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine.cache.data, written, atol=1e-6, rtol=1e-6)

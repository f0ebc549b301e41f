"""The paged decode-attention kernel (csrc/paged_attention.cpp) against gather + SDPA, and in the engine."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.engine.model import ForwardBatch
from shared.engine.native import load_paged_attention

TINY = "random:" + json.dumps(dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=16, max_position_embeddings=256))


def reference(q: torch.Tensor, cache: torch.Tensor, layer: int, tables: torch.Tensor, lens: torch.Tensor
              ) -> torch.Tensor:
    """Gather each sequence's blocks, mask past its length, SDPA in float32."""
    B, H, D = q.shape
    N, bs, KVH = tables.shape[1], cache.shape[3], cache.shape[4]
    k = cache[:, layer, 0][tables].reshape(B, N * bs, KVH, D).transpose(1, 2).float()
    v = cache[:, layer, 1][tables].reshape(B, N * bs, KVH, D).transpose(1, 2).float()
    mask = (torch.arange(N * bs) < lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.reshape(B, KVH, H // KVH, D).float(), k, v, attn_mask=mask)
    return out.reshape(B, H, D)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_dim", [64, 24])  # a specialised size and the generic path
def test_kernel_matches_gather_and_sdpa(dtype: torch.dtype, tol: float, head_dim: int) -> None:
    load_paged_attention()
    g = torch.Generator().manual_seed(0)
    blocks, layers, bs, kv_heads, heads = 40, 3, 16, 3, 9
    cache = torch.randn(blocks, layers, 2, bs, kv_heads, head_dim, generator=g).to(dtype)
    lens = torch.tensor([1, 16, 17, 75, 40])  # one token, a full block, one past it, several blocks
    tables = torch.randperm(blocks, generator=g)[:5 * 5].view(5, 5)  # scattered, not in order
    # q as the model hands it over: a view of the fused qkv projection, rows not contiguous
    qkv = torch.randn(5, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q = qkv[:, : heads * head_dim].view(5, heads, head_dim)
    for layer in range(layers):
        out = torch.ops.distserve.paged_decode_attention(q, cache, layer, tables, lens, head_dim ** -0.5)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.float(), reference(q, cache, layer, tables, lens), atol=tol, rtol=tol)


def test_kernel_rejects_bad_input() -> None:
    load_paged_attention()
    cache = torch.zeros(4, 1, 2, 16, 2, 8)
    q, lens = torch.zeros(1, 4, 8), torch.tensor([20])
    op = torch.ops.distserve.paged_decode_attention
    with pytest.raises(RuntimeError, match="block id out of range"):
        op(q, cache, 0, torch.tensor([[0, 9]]), lens, 1.0)
    with pytest.raises(RuntimeError, match="layer out of range"):
        op(q, cache, 1, torch.tensor([[0, 1]]), lens, 1.0)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        op(q.double(), cache, 0, torch.tensor([[0, 1]]), lens, 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        op(q, cache, 0, torch.tensor([[0, 1]], dtype=torch.int32), lens, 1.0)


def decode_step(dtype: str = "float32") -> tuple[LLMEngine, ForwardBatch]:
    """A tiny engine (gather + SDPA) whose next batch is a decode step of five sequences, their contexts
    inside a block, across blocks and over many; the batch, not yet run."""
    engine = LLMEngine(EngineConfig(model=TINY, block_size=4, max_num_seqs=8, kv_cache_memory_gib=0.01,
                                    dtype=dtype, weights="native", paged_attention=False))  # type: ignore[arg-type]
    for i, n in enumerate([5, 19, 33, 2, 60]):
        engine.add_request(f"r{i}", [(11 * j + i) % 250 + 3 for j in range(n)],
                           SamplingParams(max_tokens=8, ignore_eos=True))
    while engine.stats().num_waiting:
        engine.step()
    batch, _ = engine.runner.prepare(engine.scheduler.schedule())
    assert batch.num_decode == 5 and not batch.prefill_spans
    return engine, batch


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engines_decode_step_computes_the_same_with_the_kernel(dtype: str) -> None:
    """Logits, not greedy tokens: the tiny random model's tokens hardly depend on attention at all."""
    engine, batch = decode_step(dtype)
    want = engine.model(batch, engine.cache)  # gather + SDPA; each call writes the same K/V
    engine.model.use_paged_attention(torch.device("cpu"))
    tol = 1e-5 if dtype == "float32" else 2e-2
    torch.testing.assert_close(engine.model(batch, engine.cache), want, atol=tol, rtol=tol)

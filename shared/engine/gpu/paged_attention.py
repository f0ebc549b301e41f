"""Paged decode attention in Triton: one query token per sequence, K and V read from the block-major
cache through each sequence's block table, grouped-query heads, an online softmax over the blocks.

Same contract as the C++ op `distserve::paged_decode_attention` (shared/engine/csrc/paged_attention.cpp)
and the gather + SDPA path of `Attention._decode_attention`: q [B, H, D], cache [num_blocks, layers,
2, block_size, KVH, D], block_tables [B, N], context_lens [B] (the new token included) -> [B, H, D].
One program per (sequence, KV head) computes that KV head's G = H / KVH query heads together, so each
K/V block is read once for all of them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, cache_ptr, tables_ptr, lens_ptr, out_ptr, scale, layer,
                         stride_qb, stride_qh, stride_cb, stride_cl, stride_ckv, stride_cs, stride_ch, stride_tb,
                         stride_ob, stride_oh,
                         G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GP)  # query heads of this KV head, padded to a power of two
    d = tl.arange(0, D)
    s = tl.arange(0, BLOCK)
    heads = kv_head * G + g
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None],
                other=0.0).to(tl.float32)
    context = tl.load(lens_ptr + seq)
    m = tl.full([GP], float("-inf"), tl.float32)
    total = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for i in range(0, tl.cdiv(context, BLOCK)):  # every block has at least one position inside the context
        block = tl.load(tables_ptr + seq * stride_tb + i)
        base = cache_ptr + block * stride_cb + layer * stride_cl + kv_head * stride_ch
        inside = (i * BLOCK + s) < context
        offsets = s[:, None] * stride_cs + d[None, :]
        k = tl.load(base + offsets, mask=inside[:, None], other=0.0).to(tl.float32)  # [BLOCK, D]
        v = tl.load(base + stride_ckv + offsets, mask=inside[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GP, BLOCK]
        scores = tl.where(inside[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / total[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None])


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    batch, heads, head_dim = q.shape
    _, _, _, block_size, kv_heads, cache_head_dim = cache.shape
    if head_dim != cache_head_dim or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit a cache of {kv_heads} KV heads of size {cache_head_dim}")
    if head_dim & (head_dim - 1) or block_size & (block_size - 1):
        raise ValueError("head_dim and block_size must be powers of two")
    if q.stride(2) != 1 or cache.stride(5) != 1:
        raise ValueError("q and the cache need a contiguous head_dim")
    group = heads // kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, kv_heads)](
        q, cache, block_tables, context_lens, out, scale, layer,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        cache.stride(4), block_tables.stride(0), out.stride(0), out.stride(1),
        G=group, GP=triton.next_power_of_2(group), D=head_dim, BLOCK=block_size)
    return out


def reference(q: torch.Tensor, cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
              context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The same attention in plain torch, one sequence at a time (what the kernel must match)."""
    heads, kv_heads, block_size = q.shape[1], cache.shape[4], cache.shape[3]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        blocks = block_tables[b, : (n + block_size - 1) // block_size]
        k = cache[blocks, layer, 0].reshape(-1, kv_heads, q.shape[2])[:n].float()  # [n, KVH, D]
        v = cache[blocks, layer, 1].reshape(-1, kv_heads, q.shape[2])[:n].float()
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), k) * scale, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", weights, v).to(q.dtype)
    return out

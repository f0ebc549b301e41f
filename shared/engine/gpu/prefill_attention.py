"""Prefill attention in Triton over packed variable-length prompts (flash-attention style, causal), and
the store of their K and V into the paged cache.

Prompts are packed as in the engine's batches: q [T, H, D], k and v [T, KVH, D], with `starts` [S + 1]
giving each prompt's first row (vLLM's cu_seqlens). One program computes a tile of BLOCK_M query rows
of one prompt for one head, walking K/V tiles only up to the causal limit with an online softmax;
grouped-query heads read their KV head (h // G). `store_kv` writes each token's K and V into its slot
of the block-major cache [num_blocks, layers, 2, block_size, KVH, D] (vLLM's reshape_and_cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, starts_ptr, scale,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
                    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(starts_ptr + seq)
    length = tl.load(starts_ptr + seq + 1) - start
    if tile * BLOCK_M >= length:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # positions within the prompt
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=(rows < length)[:, None], other=0.0).to(tl.float32)
    kv_head = head // G
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    last = tl.minimum(length, (tile + 1) * BLOCK_M)  # causal: no key past the tile's last query
    for first in range(0, last, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        inside = cols < length
        k = tl.load(k_ptr + (start + cols)[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
                    mask=inside[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + (start + cols)[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
                    mask=inside[:, None], other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_M, BLOCK_N]
        allowed = (cols[None, :] <= rows[:, None]) & inside[None, :]
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m = m_new
    out = acc / total[:, None]
    tl.store(out_ptr + (start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rows < length)[:, None])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
                      scale: float, longest: int | None = None, block_m: int = 16, block_n: int = 16) -> torch.Tensor:
    """Causal attention of each packed prompt to itself: q [T, H, D], k and v [T, KVH, D] -> [T, H, D].

    `longest`, the longest prompt, sizes the grid: given by the caller, it costs no device-to-host copy."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if k.shape != v.shape or k.shape[0] != tokens or heads % kv_heads or k.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError("head_dim must be a power of two, at least 16")
    if k.stride() != v.stride() or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("k and v need the same layout, and every head_dim must be contiguous")
    out = torch.empty_like(q)
    if longest is None:
        longest = int((starts[1:] - starts[:-1]).max()) if len(starts) > 1 else 0
    grid = (triton.cdiv(longest, block_m), len(starts) - 1, heads)
    _prefill_kernel[grid](q, k, v, out, starts, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                          out.stride(0), out.stride(1), G=heads // kv_heads, D=head_dim, BLOCK_M=block_m,
                          BLOCK_N=block_n)
    return out


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, cache_ptr, slots_ptr, layer, stride_kt, stride_kh,
                     stride_cb, stride_cl, stride_ckv, stride_cs, stride_ch,
                     KVH: tl.constexpr, KVHP: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token)  # block * BLOCK_SIZE + offset
    h = tl.arange(0, KVHP)
    d = tl.arange(0, D)
    mask = (h < KVH)[:, None]
    source = token * stride_kt + h[:, None] * stride_kh + d[None, :]
    target = (cache_ptr + (slot // BLOCK_SIZE) * stride_cb + layer * stride_cl + (slot % BLOCK_SIZE) * stride_cs
              + h[:, None] * stride_ch + d[None, :])
    tl.store(target, tl.load(k_ptr + source, mask=mask).to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(target + stride_ckv, tl.load(v_ptr + source, mask=mask).to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, layer: int, slots: torch.Tensor) -> None:
    """Write token i's K and V [T, KVH, D] into cache slot slots[i] (block * block_size + offset) of `layer`."""
    tokens, kv_heads, head_dim = k.shape
    if cache.shape[4:] != (kv_heads, head_dim) or k.stride() != v.stride() or k.stride(2) != 1:
        raise ValueError(f"k {tuple(k.shape)} does not fit the cache {tuple(cache.shape)}")
    _store_kv_kernel[(tokens,)](k, v, cache, slots, layer, k.stride(0), k.stride(1), cache.stride(0),
                                cache.stride(1), cache.stride(2), cache.stride(3), cache.stride(4), KVH=kv_heads,
                                KVHP=triton.next_power_of_2(kv_heads), D=head_dim, BLOCK_SIZE=cache.shape[3])


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, scale: float) -> torch.Tensor:
    """The same attention in torch, one prompt at a time."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1).float() for t in (q, k, v))  # [heads, n, D]
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        n = b - a
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out[a:b] = (torch.softmax(scores, -1) @ vs).transpose(0, 1).to(q.dtype)
    return out

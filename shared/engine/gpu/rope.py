"""Rotate-half RoPE in Triton, in place on the packed q and k heads of a batch: the engine's
`apply_rope_` (shared/engine/model.py) with its tables, cos and sin [T, 1, D] where sin carries the
rotate-half sign, so that x' = x * cos + swap_halves(x) * sin."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_ct, heads,
                 HP: tl.constexpr, HALF: tl.constexpr):
    token = tl.program_id(0)
    h = tl.arange(0, HP)[:, None]
    i = tl.arange(0, HALF)[None, :]
    mask = h < heads
    low_ptr = x_ptr + token * stride_xt + h * stride_xh + i
    low = tl.load(low_ptr, mask=mask, other=0.0).to(tl.float32)
    high = tl.load(low_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    cos_low = tl.load(cos_ptr + token * stride_ct + i).to(tl.float32)
    cos_high = tl.load(cos_ptr + token * stride_ct + HALF + i).to(tl.float32)
    sin_low = tl.load(sin_ptr + token * stride_ct + i).to(tl.float32)
    sin_high = tl.load(sin_ptr + token * stride_ct + HALF + i).to(tl.float32)
    kind = x_ptr.dtype.element_ty
    tl.store(low_ptr, (low * cos_low + high * sin_low).to(kind), mask=mask)
    tl.store(low_ptr + HALF, (high * cos_high + low * sin_high).to(kind), mask=mask)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """RoPE in place on x [T, heads, D] (heads of q and k together), cos and sin [T, 1, D]."""
    tokens, heads, head_dim = x.shape
    if head_dim % 2 or (head_dim // 2) & (head_dim // 2 - 1) or x.stride(2) != 1:
        raise ValueError("head_dim must be twice a power of two, and contiguous")
    if cos.shape != (tokens, 1, head_dim) or sin.shape != cos.shape or cos.stride() != sin.stride():
        raise ValueError(f"cos and sin must be [{tokens}, 1, {head_dim}] with the same layout")
    _rope_kernel[(tokens,)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), heads,
                            HP=triton.next_power_of_2(heads), HALF=head_dim // 2)

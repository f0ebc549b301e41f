"""RMSNorm in Triton, optionally fused with the residual add before it (vLLM's fused_add_rms_norm):
`residual += x; out = rms_norm(residual) * weight` in one pass over each row, in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o, n, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * stride_r + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(residual_ptr + row * stride_r + cols, x.to(residual_ptr.dtype.element_ty), mask=inside)
    inverse = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (x * inverse * weight).to(out_ptr.dtype.element_ty), mask=inside)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """rms_norm(x [+ residual]) * weight for x [rows, n]; with `residual`, it is updated in place to x + residual."""
    if x.dim() != 2 or x.stride(1) != 1 or (residual is not None and residual.shape != x.shape):
        raise ValueError("x must be [rows, n] with contiguous rows, and residual of the same shape")
    rows, n = x.shape
    out = torch.empty_like(x)
    r = residual if residual is not None else x
    _rms_norm_kernel[(rows,)](x, r, weight, out, x.stride(0), r.stride(0), out.stride(0), n, eps,
                              HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n))
    return out

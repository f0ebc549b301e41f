"""Weight-only int8: linear weights stored as int8 with one float scale per output row.

Decode reads every weight once per step, so on a memory-bound CPU a quarter of the bytes is most of
the win; activations stay in floating point (torch's `_weight_int8pack_mm` kernel).

On the AVX2 CPUs this project runs on, that kernel costs about as much per row as for one row (8 rows
cost 8x), so inputs of more rows dequantize the weight and run one float GEMM instead; otherwise a
512-token prefill would take about a minute (docs/performance.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

KERNEL_MAX_ROWS = 2  # above this, dequantize + GEMM beats the int8 kernel (measured on AVX2)


class Int8Linear(nn.Module):
    weight: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out], one per output row

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if rows.shape[0] > KERNEL_MAX_ROWS:
            return F.linear(x, self.weight.to(x.dtype) * self.scales[:, None], self.bias)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_int8_(model: nn.Module) -> None:
    """Replace every nn.Linear (the LM head too; the embedding table stays float) in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear(child))
        else:
            quantize_int8_(child)

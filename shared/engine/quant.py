"""Linear layers with fp16 or int8 weights, for CPU decode, where every step reads every weight.

- "fp16" (`Fp16Linear`): weights in half precision, packed once at load time for FBGEMM, torch's
  kernel library for CPU inference, whose small-batch kernels widen them to fp32 in registers
  (F16C); activations and sums stay fp32. Half the bytes, and much faster than MKL's fp32 GEMM on
  the few rows of a decode step, which MKL serves poorly on this AVX2 CPU (8 rows cost 2.6x one
  row). Logits stay within 2e-3 of fp32 relative to their range (tests/engine/test_weights.py).
  Whole decode steps of SmolLM2-135M on 1 thread of the 2-core machine: fp32 80 / 180 / 248 ms at
  batch 1 / 8 / 16, fp16 46 / 86 / 162 ms (`distserve bench engine`, docs/performance.md).
- "int8" (`Int8Linear`): weight-only int8, one float scale per output row, activations in floating
  point (torch's `_weight_int8pack_mm`). That kernel costs about as much per row as for one row on
  AVX2 (8 rows cost 8x), so inputs of more rows dequantize the weight and run one float GEMM; kept as
  the measured option, it does not pay here. FBGEMM's dynamic int8 (activations quantized too) is
  fast but moved the top-1 token at half of the positions of a test text: not offered.

FBGEMM's packed weight is an opaque TorchScript object, which torch.compile cannot take as an op
argument. Compiled graphs (shared/engine/compiled.py) call `distserve::fp16_linear` instead, a small
C++ op (csrc/fp16_linear.cpp, built at first use) that runs the same kernel on a weight handed to it
once and named by an int key (`make_traceable_`).

torch 2.13 marks FBGEMM's fp16 entry points deprecated (in favour of torchao, which has no AVX2
kernel for this); the project pins torch 2.13, and the warning is silenced where it is raised.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from shared.engine.native import load_op_library

KERNEL_MAX_ROWS = 2  # above this, dequantize + GEMM beats the int8 kernel (measured on AVX2)


@functools.cache
def load_fp16_op() -> None:
    """Load distserve::fp16_linear (csrc/fp16_linear.cpp, built at first use: shared/engine/native.py)."""
    load_op_library("fp16_linear")

    def fake(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], out_features)

    torch.library.register_fake("distserve::fp16_linear", fake)


class Fp16Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.key: int | None = None  # this weight's key for distserve::fp16_linear, once traceable
        w = linear.weight.detach().float()
        bias = None if linear.bias is None else linear.bias.detach().float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.packed: Any = torch.ops.quantized.linear_prepack_fp16(w, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_nbytes = 2 * w.numel()  # what a step reads (the packed weight is not a tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if torch.compiler.is_compiling():
            if self.key is None:
                raise RuntimeError("compiling an Fp16Linear needs make_traceable_(model) first")
            y = torch.ops.distserve.fp16_linear(rows, self.key, self.out_features)
        else:  # eager: the quantized op itself, one lookup fewer
            y = torch.ops.quantized.linear_dynamic_fp16(rows, self.packed)
        return y.reshape(*x.shape[:-1], self.out_features)

    def make_traceable(self) -> None:
        """Hand the packed weight to distserve::fp16_linear, which compiled graphs call instead."""
        if self.key is None:
            load_fp16_op()
            self.key = int(torch.ops.distserve.keep_fp16_weight(self.packed))
            weakref.finalize(self, torch.ops.distserve.forget_fp16_weight, self.key)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp16"


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


class PackedBf16Linear(nn.Module):
    """A bfloat16 linear layer whose weight is reordered once into oneDNN's blocked layout.

    F.linear on a plain bf16 weight has oneDNN reorder the weight for its AMX / AVX-512-BF16 kernel
    on every call: a prefill of 16 tokens spent 44 of its 58 ms in GEMMs reading weights at 6-7 GB/s.
    Reordered once at load time the same GEMMs run 25-40% faster; the model's logits stayed the same bit
    for bit on the AMX machine of docs/performance.md (tests/engine/test_weights.py allows rounding).
    The reordered weight is an opaque MKLDNN tensor that torch.compile cannot trace, so the layer keeps
    the plain weight too when the engine compiles its decode steps (compiled graphs use it).
    """

    def __init__(self, linear: nn.Linear, keep_plain: bool) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        self.weight = nn.Parameter(w, requires_grad=False) if keep_plain else None
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_nbytes = w.numel() * w.element_size()  # what an eager step reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            if self.weight is None:
                raise RuntimeError("compiling a PackedBf16Linear built without keep_plain")
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=bf16 packed"


def can_pack_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU (AVX-512 and up; measured only with AMX, where it pays)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_bf16_linears_(model: nn.Module, keep_plain: bool) -> None:
    """Replace every bf16 nn.Linear with a PackedBf16Linear, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16:
            setattr(model, name, PackedBf16Linear(child, keep_plain))
        else:
            pack_bf16_linears_(child, keep_plain)


def convert_linears_(model: nn.Module, weights: Literal["fp16", "int8"]) -> None:
    """Replace every nn.Linear in place (the LM head too, untied; the embedding table stays float)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Fp16Linear(child) if weights == "fp16" else Int8Linear(child))
        else:
            convert_linears_(child, weights)


def make_traceable_(model: nn.Module) -> None:
    """Let torch.compile trace every Fp16Linear of the model (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, Fp16Linear):
            module.make_traceable()

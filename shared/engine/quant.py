"""Linear layers with reduced-precision weights, for CPU decode, where every step reads every weight.

- "fp16" (`Fp16Linear`): weights in half precision, packed once at load time for FBGEMM, torch's
  kernel library for CPU inference, whose small-batch kernels widen them to fp32 in registers
  (F16C); activations and sums stay fp32. Half the bytes of fp32, a GEMM-class kernel from one row
  to hundreds, logits within 2e-3 of fp32 relative to their range (tests/engine/test_weights.py).
- "q4_1" / "q8_0" (`BlockQuantLinear`): GGUF's block formats (0.625 / 1.06 bytes a weight), kept as
  the default model's file stores them, read by our kernel (csrc/quant_linear.cpp) with the activations
  quantized to int8 per block of 32, as llama.cpp does. Fastest at batch 1 in eager steps; from about
  8 rows FBGEMM's fp16 is faster on an AVX2 CPU, and prefill (> 64 rows) widens the weight for one GEMM
  (docs/performance.md). q4_1 keeps the LM head in q8_0.
- "int8" (`Int8Linear`): weight-only int8, one float scale per output row, activations in floating
  point (torch's `_weight_int8pack_mm`). That kernel costs about as much per row as for one row on
  AVX2 (8 rows cost 8x), so inputs of more rows dequantize the weight and run one float GEMM; kept as
  the measured option, it does not pay here.

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


# -- GGUF's block formats, dequantized in the kernel (csrc/quant_linear.cpp) ------------------------------

BLOCK = 32  # weights per block, along the input dimension
BLOCK_MAX_ROWS = 64  # up to this many input rows, the fused kernel; beyond (prefill), one GEMM on the widened weight
BlockFormat = Literal["q4_1", "q8_0"]


@functools.cache
def load_block_ops() -> None:
    """Load distserve::q4_1_linear and q8_0_linear (csrc/quant_linear.cpp, built at first use)."""
    load_op_library("quant_linear")
    register_block_fakes("distserve")


def register_block_fakes(namespace: str) -> None:
    """Shapes for torch.compile: the ops take plain tensors, so compiled graphs call them directly."""
    def q4_1(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], qs.shape[0])

    def q8_0(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], qs.shape[0])

    torch.library.register_fake(f"{namespace}::q4_1_linear", q4_1)
    torch.library.register_fake(f"{namespace}::q8_0_linear", q8_0)


def quantize_blocks(w: torch.Tensor, fmt: BlockFormat) -> dict[str, torch.Tensor]:
    """A [N, K] weight in `fmt`'s blocks (K a multiple of 32), as GGUF quantizes: q4_1 maps each block's
    minimum to 0 and its maximum to 15, q8_0 its largest magnitude to 127, with fp16 scales. A weight that
    was dequantized from these very blocks (a GGUF model's) comes back unchanged."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"{fmt} needs an input dimension that is a multiple of {BLOCK}, not {k}")
    blocks = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    if fmt == "q8_0":
        d = (blocks.abs().amax(-1) / 127).half()
        scale = d.float()[..., None]
        q = torch.where(scale > 0, blocks / scale.clamp(min=1e-30), 0).round().clamp(-127, 127)
        return {"qs": q.to(torch.int8).reshape(n, k).contiguous(), "d": d.contiguous()}
    m = blocks.amin(-1).half()
    d = ((blocks.amax(-1) - m.float()) / 15).half()
    scale = d.float()[..., None]
    q = torch.where(scale > 0, (blocks - m.float()[..., None]) / scale.clamp(min=1e-30), 0).round().clamp(0, 15)
    q = q.to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)  # byte j: weight j (low nibble), weight j + 16 (high)
    return {"qs": packed.reshape(n, k // 2).contiguous(), "d": d.contiguous(), "m": m.contiguous()}


def dequantize_blocks(blocks: dict[str, torch.Tensor], fmt: BlockFormat) -> torch.Tensor:
    """The float32 [N, K] weight of quantize_blocks' output (the exact inverse for a GGUF model's weights)."""
    qs, d = blocks["qs"], blocks["d"].float()[..., None]
    n = qs.shape[0]
    if fmt == "q8_0":
        return (qs.reshape(n, -1, BLOCK).float() * d).reshape(n, -1)
    q = qs.reshape(n, -1, 16)
    nibbles = torch.cat([q & 15, q >> 4], dim=-1).float()
    return (nibbles * d + blocks["m"].float()[..., None]).reshape(n, -1)


class BlockQuantLinear(nn.Module):
    """A linear layer whose weight stays in a GGUF block format (q4_1 or q8_0): 0.625 or 1.06 bytes per
    weight against 2 for fp16, read once per decode step by the fused kernel."""

    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    def __init__(self, linear: nn.Linear, fmt: BlockFormat) -> None:
        super().__init__()
        load_block_ops()
        self.fmt = fmt
        blocks = quantize_blocks(linear.weight, fmt)
        self.register_buffer("qs", blocks["qs"])
        self.register_buffer("d", blocks["d"])
        self.register_buffer("m", blocks.get("m"))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_nbytes = sum(t.numel() * t.element_size() for t in blocks.values())  # what a step reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= BLOCK_MAX_ROWS or torch.compiler.is_compiling():
            if self.m is not None:
                y = torch.ops.distserve.q4_1_linear(rows, self.qs, self.d, self.m)
            else:
                y = torch.ops.distserve.q8_0_linear(rows, self.qs, self.d)
            if self.bias is not None:
                y = y + self.bias
        else:  # prefill: widening the weight once costs less than the GEMM it feeds
            y = F.linear(rows, self.dequantized(), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        blocks = {"qs": self.qs, "d": self.d} | ({"m": self.m} if self.m is not None else {})
        return dequantize_blocks(blocks, self.fmt)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.fmt}"


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


def convert_linears_(model: nn.Module, weights: Literal["fp16", "int8", "q8_0", "q4_1"]) -> None:
    """Replace every nn.Linear in place (the LM head too, untied; the embedding table stays float).

    With q4_1 the LM head is q8_0, as GGUF's 4-bit models keep their output layer (the default model's
    tied embedding table is q8_0 in its file): 4 bits there would move the top token most."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            fmt = "q8_0" if weights == "q4_1" and name == "lm_head" else weights
            setattr(model, name, _convert(child, fmt))
        else:
            convert_linears_(child, weights)


def _convert(linear: nn.Linear, weights: Literal["fp16", "int8", "q8_0", "q4_1"]) -> nn.Module:
    if weights == "fp16":
        return Fp16Linear(linear)
    if weights == "int8":
        return Int8Linear(linear)
    return BlockQuantLinear(linear, weights)


def make_traceable_(model: nn.Module) -> None:
    """Let torch.compile trace every Fp16Linear of the model (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, Fp16Linear):
            module.make_traceable()

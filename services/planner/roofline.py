"""Analytical profiles: step times from a model's shape and a GPU's peak FLOP/s, bandwidth and memory.

A step costs max(compute time, memory time) plus tensor-parallel all-reduces and a per-layer fixed
cost. Instead of a second latency formula, the roofline times are sampled over a grid of batches and
fitted with the same least squares as a measured profile, so the result is an ordinary
``LatencyModel``. The efficiency constants were chosen by a grid search against the A100 reference
profiles of OPT-13B and OPT-66B (RMS log error 13% over their TP degrees; docs/planner.md): they are
estimates for other GPUs, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.planner.latency import (
    DEFAULT_THRESHOLD,
    DecodeSample,
    LatencyModel,
    PrefillSample,
    fit_step_profile,
)
from services.planner.specs import GPUSpec, ModelShape


@dataclass(frozen=True)
class Efficiency:
    compute: float = 0.6  # fraction of peak FLOP/s reached by the dense GEMMs
    attention: float = 0.5  # prefill attention kernels (softmax traffic, causal masking)
    memory: float = 0.8  # fraction of peak HBM bandwidth
    layer_overhead_s: float = 200e-6  # kernel launches and small ops per layer per step
    allreduce_latency_s: float = 15e-6
    memory_utilization: float = 0.92  # share of GPU memory for weights and KV (rest: activations, runtime)


class Roofline:
    def __init__(self, shape: ModelShape, gpu: GPUSpec, eff: Efficiency = Efficiency()) -> None:
        self.shape, self.gpu, self.eff = shape, gpu, eff
        s = shape
        self.dense_flops_per_token = 2.0 * s.num_layers * s.layer_params
        self.head_flops_per_seq = 2.0 * s.vocab_size * s.hidden_size  # logits for the last position only

    def _common(self, tp: int, tokens: float, compute: float, memory: float) -> float:
        s, e = self.shape, self.eff
        comm = 0.0
        if tp > 1:  # two ring all-reduces of the activations per layer
            nbytes = tokens * s.hidden_size * s.dtype_bytes
            comm = 2 * s.num_layers * (2 * (tp - 1) / tp * nbytes / self.gpu.nvlink_bandwidth + e.allreduce_latency_s)
        return max(compute, memory) + comm + s.num_layers * e.layer_overhead_s

    def prefill_seconds(self, tp: int, lengths: list[int]) -> float:
        s, e, g = self.shape, self.eff, self.gpu
        tokens, sq = sum(lengths), sum(x * x for x in lengths)
        dense_flops = self.dense_flops_per_token * tokens + self.head_flops_per_seq * len(lengths)
        dense = dense_flops / (tp * g.peak_flops * e.compute)
        attn = 2.0 * s.num_layers * s.hidden_size * sq / (tp * g.peak_flops * e.attention)  # causal QK^T and AV
        memory = (s.weight_bytes + tokens * s.kv_bytes_per_token) / (tp * g.memory_bandwidth * e.memory)
        return self._common(tp, tokens, dense + attn, memory)

    def decode_seconds(self, tp: int, batch: int, sum_ctx: int) -> float:
        s, e, g = self.shape, self.eff, self.gpu
        attention_flops = 4.0 * s.num_layers * s.hidden_size * sum_ctx
        flops = (self.dense_flops_per_token + self.head_flops_per_seq) * batch + attention_flops
        compute = flops / (tp * g.peak_flops * e.compute)
        memory = (s.weight_bytes + sum_ctx * s.kv_bytes_per_token) / (tp * g.memory_bandwidth * e.memory)
        return self._common(tp, batch, compute, memory)

    def samples(self, tp: int) -> tuple[list[PrefillSample], list[DecodeSample]]:
        prefill = [PrefillSample(tuple([n] * b), self.prefill_seconds(tp, [n] * b))
                   for n in (16, 64, 128, 256, 512, 1024, 2048) for b in (1, 2, 4, 8) if n * b <= 4096]
        decode = [DecodeSample(b, b * ctx, self.decode_seconds(tp, b, b * ctx))
                  for b in (1, 2, 4, 8, 16, 32, 64, 95, 96, 128, 192, 256, 384, 512)
                  for ctx in (64, 256, 512, 1024, 2048)]
        return prefill, decode


def tp_degrees(shape: ModelShape, max_tp: int = 8) -> list[int]:
    """TP degrees that split the attention heads evenly (KV heads may be replicated)."""
    kv = shape.num_kv_heads
    return [t for t in range(1, max_tp + 1)
            if shape.num_heads % t == 0 and (kv % t == 0 or t % kv == 0)]


def roofline_model(shape: ModelShape, gpu: GPUSpec, eff: Efficiency = Efficiency(),
                   tps: list[int] | None = None) -> LatencyModel:
    roof = Roofline(shape, gpu, eff)
    steps = {}
    for tp in tps or tp_degrees(shape):
        prefill, decode = roof.samples(tp)
        steps[tp] = fit_step_profile(prefill, decode, DEFAULT_THRESHOLD)
    return LatencyModel(
        model=shape.name, hardware=gpu.name, source="roofline", steps=steps,
        kv_bytes_per_token=shape.kv_bytes_per_token,
        usable_bytes_per_gpu=gpu.memory_bytes * eff.memory_utilization,
        weight_bytes=float(shape.weight_bytes),
    )

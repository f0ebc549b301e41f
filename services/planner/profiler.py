"""Measure our engine's step times on this machine and fit them into a LatencyModel.

Prefill samples: ``b`` prompts of ``l`` random tokens run as one prefill step (max_tokens=1).
Decode samples: ``b`` sequences prefilled to ``ctx`` tokens, then each decode step is timed with
its batch and summed context. The result has TP=1 only and ``max_pp=1``: this machine cannot shard.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from services.planner.latency import DecodeSample, LatencyModel, PrefillSample, fit_step_profile
from shared.engine import EngineConfig, LLMEngine, SamplingParams


@dataclass(frozen=True)
class Grid:
    prefill_lengths: tuple[int, ...] = (16, 64, 128, 256, 512)
    prefill_batches: tuple[int, ...] = (1, 2, 4)
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    decode_contexts: tuple[int, ...] = (32, 128, 512)
    decode_steps: int = 4  # timed decode steps per (batch, context)
    repeats: int = 2  # prefill steps per point; the median is kept

    def __post_init__(self) -> None:
        for name in ("prefill_lengths", "prefill_batches", "decode_batches", "decode_contexts"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"{name} must be a non-empty list of positive integers")
        if self.decode_steps < 1 or self.repeats < 1:
            raise ValueError("decode_steps and repeats must be >= 1")
        if len({(n * b) for n in self.prefill_lengths for b in self.prefill_batches}) < 3:
            raise ValueError("the prefill grid needs at least 3 distinct points to fit 3 coefficients")

    @property
    def max_prefill_tokens(self) -> int:
        return max(self.prefill_lengths) * max(self.prefill_batches)


def _prompts(engine: LLMEngine, n: int, length: int, gen: torch.Generator) -> list[list[int]]:
    vocab = engine.model_config.vocab_size
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def measure_prefill(engine: LLMEngine, grid: Grid, gen: torch.Generator) -> list[PrefillSample]:
    samples = []
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for length in grid.prefill_lengths:
        for b in grid.prefill_batches:
            times = []
            for r in range(grid.repeats):
                for k, prompt in enumerate(_prompts(engine, b, length, gen)):
                    engine.add_request(f"p{length}-{b}-{r}-{k}", prompt, params)
                start = time.perf_counter()
                outputs = engine.step()
                times.append(time.perf_counter() - start)
                if len(outputs) != b or engine.has_unfinished():
                    raise RuntimeError(f"a prefill of {b}x{length} tokens did not run as one step")
            samples.append(PrefillSample((length,) * b, statistics.median(times)))
    return samples


def measure_decode(engine: LLMEngine, grid: Grid, gen: torch.Generator) -> list[DecodeSample]:
    samples = []
    params = SamplingParams(max_tokens=grid.decode_steps + 2, temperature=0.0, ignore_eos=True)
    for ctx in grid.decode_contexts:
        for b in grid.decode_batches:
            ids = [f"d{ctx}-{b}-{k}" for k in range(b)]
            for rid, prompt in zip(ids, _prompts(engine, b, ctx, gen), strict=True):
                engine.add_request(rid, prompt, params)
            while engine.stats().num_waiting:
                engine.step()  # prefill, untimed (each prompt produced one token: context ctx + 1)
            for j in range(grid.decode_steps):
                start = time.perf_counter()
                outputs = engine.step()
                seconds = time.perf_counter() - start
                if len(outputs) != b:
                    raise RuntimeError(f"decode step ran {len(outputs)} sequences, expected {b}")
                samples.append(DecodeSample(b, b * (ctx + 1 + j), seconds))
            for rid in ids:
                engine.abort(rid)
    return samples


def profile_engine(config: EngineConfig, grid: Grid, name: str, hardware: str | None = None,
                   seed: int = 0) -> LatencyModel:
    """Run ``grid`` on an engine built from ``config`` and fit the step formulas."""
    longest = max(max(grid.decode_contexts) + grid.decode_steps + 2, max(grid.prefill_lengths) + 1)
    config = EngineConfig(**{
        **config.model_dump(), "role": "colocated", "chunked_prefill": False,
        "max_num_batched_tokens": max(config.max_num_batched_tokens, grid.max_prefill_tokens),
        "max_num_seqs": max(config.max_num_seqs, max(grid.decode_batches)),
        "max_model_len": max(config.max_model_len or 0, longest)})
    engine = LLMEngine(config)
    if engine.max_model_len < longest:
        raise ValueError(f"the grid needs {longest}-token contexts; the model allows {engine.max_model_len}")
    gen = torch.Generator().manual_seed(seed)
    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.add_request("warmup", _prompts(engine, 1, 8, gen)[0], warm)
    while engine.has_unfinished():
        engine.step()
    prefill = measure_prefill(engine, grid, gen)
    decode = measure_decode(engine, grid, gen)
    step = fit_step_profile(prefill, decode, threshold=max(grid.decode_batches))
    dtype_bytes = 2 if config.dtype == "bfloat16" else 4
    weights = float(engine.model_config.num_parameters() * dtype_bytes)
    kv_pool = float(config.kv_cache_memory_gib * 2**30)
    return LatencyModel(
        model=name, hardware=hardware or f"cpu-{platform.machine()}-{torch.get_num_threads()}t",
        source=f"measured:{config.model}", steps={1: step},
        kv_bytes_per_token=engine.model_config.kv_bytes_per_token(dtype_bytes),
        usable_bytes_per_gpu=weights + kv_pool, weight_bytes=weights, max_pp=1,
    )



def refit_to_steps(model: LatencyModel, steps: Mapping[str, Sequence[Mapping[str, Any]]],
                   workers: Sequence[str] = ()) -> LatencyModel:
    """``model`` with its step formulas fitted to the steps a stack served instead (steps.json of
    `bench compare`: shared.engine.StepRecord by '<role>:<instance id>'; ``workers``: only those ids).

    A step measured in the stack carries what a profile taken alone cannot: the services and the other
    workers sharing the cores, and the batch compositions real traffic makes. Steps that mixed prefill
    and decode (chunked prefill) fit neither formula and are left out.
    """
    prefill: list[PrefillSample] = []
    decode: list[DecodeSample] = []
    for name, records in steps.items():
        role, _, instance = name.partition(":")
        if workers and instance not in workers:
            continue
        for r in records:
            lengths = tuple(int(n) for n in r["prefill_lengths"])
            # A phase's steps from the workers that serve it (a prefill worker's one-token prompt is no decode)
            if lengths and not r["decode_batch"] and role != "decode":
                prefill.append(PrefillSample(lengths, float(r["seconds"])))
            elif r["decode_batch"] and not lengths and role != "prefill":
                decode.append(DecodeSample(int(r["decode_batch"]), int(r["decode_context"]), float(r["seconds"])))
    if len({s.lengths for s in prefill}) < 3 or len({(s.batch, s.sum_ctx) for s in decode}) < 3:
        raise ValueError(f"too few distinct steps to fit ({len(prefill)} prefill, {len(decode)} decode)"
                         + (f" among workers {', '.join(workers)}" if workers else ""))
    step = fit_step_profile(prefill, decode, threshold=max(s.batch for s in decode))
    return replace(model, steps={1: step},
                   source=f"{model.source}; refitted to {len(prefill)} prefill and {len(decode)} decode steps served")


def fit_report(model: LatencyModel) -> Sequence[str]:
    lines = []
    for tp, step in model.steps.items():
        for phase, err in step.fit_error.items():
            lines.append(f"TP{tp} {phase}: {err.samples} samples, mean relative error {err.mean_rel:.1%}, "
                         f"max {err.max_rel:.1%}")
    return lines

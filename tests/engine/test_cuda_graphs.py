"""Decode steps through the CUDA graphs' padded static buffers (shared/engine/cuda_graphs.py).

On the CPU the padded steps run eagerly (`capture=False`): everything but the capture and replay, which a
GPU runs (deploy/gpu/check.sh). Either way a padded step must give the unpadded step's logits and KV, and
its padding rows must write nowhere but the scratch block, even when a larger batch filled those rows before.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from rich.console import Console

from services.bench.engine import measure_variant
from shared.engine import LLMEngine, SamplingParams
from shared.engine.cuda_graphs import DecodeGraphs, buckets
from shared.engine.model import ForwardBatch
from tests.engine.conftest import make_engine
from tests.engine.test_cli import TINY
from tests.engine.test_device import GPU_TEST_MODEL, needs_gpu
from tests.engine.test_generation import PROMPTS

LONG = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)


def test_buckets() -> None:
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert buckets(10) == [1, 2, 4, 8, 10]
    assert buckets(1) == [1]


def decode_batch(engine: LLMEngine, prompts: list[str]) -> ForwardBatch:
    """The next decode step of `prompts` after their prefill and one decode step, as the runner prepares it."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), engine.tokenizer.encode(prompt), LONG)
    engine.step()  # every prompt's prefill
    engine.step()  # one decode step of all of them
    batch, _ = engine.runner.prepare(engine.scheduler.schedule_decode())
    assert batch.num_decode == len(prompts) and not batch.prefill_spans
    return batch


def check_padded_step(engine: LLMEngine, graphs: DecodeGraphs, batch: ForwardBatch) -> None:
    cache = engine.cache.data
    before = cache.clone()
    expected = engine.model(batch.to(cache.device), engine.cache)  # the eager, unpadded step
    written = cache.clone()
    cache.copy_(before)
    # As a larger batch left the static rows: each pointing at a real block, which padding must not write.
    used = int(batch.decode_block_tables[0, 0])
    graphs.slot_blocks.fill_(used)
    graphs.slot_offsets.zero_()
    graphs.tables[:, 0] = used
    got = graphs(batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    others = [b for b in range(cache.shape[0]) if b != graphs.scratch_block]
    torch.testing.assert_close(cache[others], written[others], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_prompts", [3, 5])  # buckets of 4 and 8: one and three padding rows
def test_a_padded_decode_step_gives_the_unpadded_logits_and_kv(num_prompts: int) -> None:
    engine = make_engine(dtype="float32", max_num_seqs=8)
    assert engine.runner.graphs is None  # a CPU engine runs no CUDA graph
    scratch = engine.blocks.allocate(1)[0]  # no request gets it
    batch = decode_batch(engine, PROMPTS[:num_prompts])
    max_blocks = -(-engine.max_model_len // engine.config.block_size)
    graphs = DecodeGraphs(engine.model, engine.cache, scratch, max_batch=8, max_blocks=max_blocks, capture=False)
    assert graphs.covers(batch)
    check_padded_step(engine, graphs, batch)


def test_what_the_graphs_do_not_cover() -> None:
    engine = make_engine(dtype="float32", max_num_seqs=8)
    scratch = engine.blocks.allocate(1)[0]
    batch = decode_batch(engine, PROMPTS[:3])  # PROMPTS[1] has two blocks of KV by now
    assert not DecodeGraphs(engine.model, engine.cache, scratch, max_batch=2, max_blocks=4, capture=False).covers(batch)
    assert not DecodeGraphs(engine.model, engine.cache, scratch, max_batch=4, max_blocks=1, capture=False).covers(batch)
    graphs = DecodeGraphs(engine.model, engine.cache, scratch, max_batch=4, max_blocks=4, capture=False)
    assert graphs.covers(batch)
    engine.add_request("new", engine.tokenizer.encode(PROMPTS[0]), LONG)
    prefill, _ = engine.runner.prepare(engine.scheduler.schedule_prefill(1024))
    assert prefill.prefill_spans and not graphs.covers(prefill)


@needs_gpu
def test_captured_graphs_replay_the_eager_step() -> None:
    engine = make_engine(model=GPU_TEST_MODEL, device="cuda", dtype="float32", weights="native", max_num_seqs=8)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.buckets == [1, 2, 4, 8] and graphs.scratch_block == engine.runner.num_blocks
    check_padded_step(engine, graphs, decode_batch(engine, PROMPTS[:3]))


def test_bench_engine_times_decode_with_the_graphs_and_eager() -> None:
    """bench engine's GPU branch, here with graphs that run their padded steps eagerly."""
    args = argparse.Namespace(prefill_lengths=[16], decode_batches=[1, 2], context=8, warmup=0, repeat=1,
                              decode_steps=2, quality_tokens=0)
    engine = make_engine(model=TINY, dtype="float32", max_num_seqs=2, kv_cache_memory_gib=0.01)
    graphs = DecodeGraphs(engine.model, engine.cache, engine.blocks.allocate(1)[0], max_batch=2, max_blocks=16,
                          capture=False)
    engine.runner.graphs = graphs
    result = measure_variant(args, engine, "fp32", Console(quiet=True))
    assert [(d.batch, d.steps) for d in result.decodes] == [(1, "CUDA graphs"), (1, "eager"), (2, "CUDA graphs"),
                                                            (2, "eager")]
    assert engine.runner.graphs is graphs  # back for the next batch size

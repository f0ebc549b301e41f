"""EngineRunner: engine calls inline when they cannot wait, else on the call thread, always in order; paced steps."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.worker.runner import EngineRunner, StepResult
from shared.engine import EngineConfig, LLMEngine, SamplingParams

TINY = 'random:{"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, ' \
       '"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "max_position_embeddings": 512}'


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model=TINY, kv_cache_memory_gib=0.01, num_threads=1))


async def test_calls_run_inline_or_in_order_on_the_call_thread(engine: LLMEngine) -> None:
    loop = asyncio.get_running_loop()
    runner: EngineRunner[None] = EngineRunner(engine, loop, on_step=lambda result: None)  # step loop not started
    try:
        caller = threading.get_ident()
        inline = runner.call(lambda e: threading.get_ident())
        assert inline.done() and inline.result() == caller  # the lock was free and nothing pending

        order: list[str] = []
        held, release, go = threading.Event(), threading.Event(), threading.Event()

        def first_call(e: LLMEngine) -> int:
            assert go.wait(30)
            order.append("first")
            return threading.get_ident()

        def hold_lock() -> None:  # as the step thread does while it schedules: calls must not wait on the loop
            with engine.lock:
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold_lock)
        holder.start()
        try:
            assert held.wait(30)
            first = runner.call(first_call)  # the lock is taken: to the call thread
            assert not first.done()
        finally:
            release.set()
            holder.join(30)
        second = runner.call(lambda e: order.append("second"))  # the lock is free, but "first" is pending
        assert not second.done()
        go.set()
        assert await first != caller
        await second
        assert order == ["first", "second"]

        failing = runner.call(lambda e: e.add_request("bad", [], SamplingParams()))
        with pytest.raises(ValueError, match="empty"):
            await failing
        assert runner.call(lambda e: e.stats().num_waiting).result() == 0  # inline again once nothing pends
    finally:
        await runner.stop()


async def test_a_paced_runner_starts_steps_no_closer_than_its_interval(engine: LLMEngine) -> None:
    loop = asyncio.get_running_loop()
    results: list[StepResult[None]] = []
    done = asyncio.Event()

    def on_step(result: StepResult[None]) -> None:
        results.append(result)
        if any(o.finished for o in result.outputs):
            done.set()

    runner: EngineRunner[None] = EngineRunner(engine, loop, on_step=on_step, min_interval=0.2)
    runner.start()
    try:
        await runner.call(lambda e: e.add_request("paced", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True)))
        await asyncio.wait_for(done.wait(), timeout=60)
        starts = [r.started for r in results]
        assert len(starts) == 5  # one prefill step, four decode steps (each a few ms on this tiny model)
        assert all(later - earlier >= 0.2 - 1e-3 for earlier, later in zip(starts, starts[1:], strict=False))
    finally:
        await runner.stop()

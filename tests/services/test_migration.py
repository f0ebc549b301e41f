"""Migration: a request whose worker dies continues on another worker of its phase, and its client
sees one uninterrupted stream: for greedy decoding, the very text of an undisturbed run.

Faults are real and by PID: SIGKILL of a decode worker mid-stream; SIGSTOP of a prefill worker with
requests queued (it stops reporting, its requests move, and when it wakes its late first tokens are
dropped and its KV freed). Each stack has its own nats-server so its faults stay its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import openai

from services.launcher import Stack
from shared.servers import NatsServer, RedisServer
from tests.services.conftest import request_states, start_stack
from tests.services.test_stack import MODEL, kv_in_use, metric, wait_until

DEAD_AFTER_S = 1.5
PROMPTS = [f"Write a short story about a {thing}." for thing in ("cat", "lighthouse", "robot", "river", "dragon",
                                                                 "clock")]
MAX_TOKENS = 64


async def stream_all(stack: Stack, started: asyncio.Event | None = None) -> list[str]:
    """The texts of one greedy stream per prompt, run concurrently; `started` is set once every stream
    has received a few tokens."""
    api = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=120)
    counts = [0] * len(PROMPTS)

    async def one(i: int) -> str:
        stream = await api.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, stream=True,
                                              temperature=0, extra_body={"ignore_eos": True})
        text = ""
        async for chunk in stream:
            text += chunk.choices[0].text
            counts[i] += 1
            if started is not None and min(counts) >= 4:
                started.set()
        return text

    try:
        return list(await asyncio.gather(*(one(i) for i in range(len(PROMPTS)))))
    finally:
        await api.close()


async def streams_under_way(stack: Stack) -> tuple[list[str], asyncio.Future[list[str]]]:
    """Every prompt's undisturbed text, then the same streams again, returned once each has a few tokens."""
    undisturbed = await stream_all(stack)
    started = asyncio.Event()
    streams = asyncio.ensure_future(stream_all(stack, started))
    await asyncio.wait_for(started.wait(), 60)
    return undisturbed, streams


async def test_decode_worker_killed_mid_stream_its_requests_finish_on_the_other(redis_server: RedisServer) -> None:
    with NatsServer() as nats:
        stack = start_stack(nats, redis_server, decode_instances=2, worker={"dead_after_s": DEAD_AFTER_S})
        victim = next(c for c in stack.children if c.name == "decode-0")
        try:
            undisturbed, streams = await streams_under_way(stack)
            assert metric(stack, "distserve_worker_running_requests", instance="decode-0", role="decode") > 0
            os.kill(victim.proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            texts = await asyncio.wait_for(streams, 120)
            assert texts == undisturbed  # no token repeated, none missing
            moved = metric(stack, "distserve_migrations_total", role="decode")
            assert moved >= 1
            assert time.monotonic() - killed < 60
            await asyncio.sleep(0.5)  # the state writes land within milliseconds
            records = [r for r in await request_states(redis_server.url)
                       if r.get("migration", "").startswith("decode decode-1")]
            assert len(records) == moved and all(r["status"] == "finished" for r in records)
            assert await asyncio.to_thread(wait_until, lambda: kv_in_use(stack.url) == 0.0)
            assert metric(stack, "distserve_gateway_inflight_requests") == 0
        finally:
            victim.proc.wait()
            stack.stop()


async def test_stalled_prefill_worker_its_queued_requests_move_and_its_late_work_is_dropped(
        redis_server: RedisServer) -> None:
    with NatsServer() as nats:
        stack = start_stack(nats, redis_server, prefill_instances=2, worker={"dead_after_s": DEAD_AFTER_S})
        stalled = next(c for c in stack.children if c.name == "prefill-0")
        try:
            undisturbed = await stream_all(stack)
            os.kill(stalled.proc.pid, signal.SIGSTOP)  # its queue fills, and it stops reporting
            streams = asyncio.ensure_future(stream_all(stack))
            assert await asyncio.to_thread(
                wait_until, lambda: metric(stack, "distserve_migrations_total", role="prefill") >= 1, 30)
            os.kill(stalled.proc.pid, signal.SIGCONT)  # it wakes with requests that moved on without it
            texts = await asyncio.wait_for(streams, 120)
            assert texts == undisturbed
            assert await asyncio.to_thread(wait_until, lambda: metric(
                stack, "distserve_workers_alive", role="prefill") == 2)  # it rejoined
            assert await asyncio.to_thread(wait_until, lambda: kv_in_use(stack.url) == 0.0)
        finally:
            if stalled.proc.poll() is None:
                os.kill(stalled.proc.pid, signal.SIGCONT)
            stack.stop()


async def test_colocated_worker_stopped_mid_stream_hands_its_requests_over(redis_server: RedisServer) -> None:
    """SIGTERM: the worker gives its requests up (shutting down) and the gateway continues them on the
    other colocated worker, which computes the KV of the prompt and the tokens streamed so far."""
    with NatsServer() as nats:
        stack = start_stack(nats, redis_server, mode="colocated", colocated_instances=2)
        leaving = next(c for c in stack.children if c.name == "colocated-0")
        try:
            undisturbed, streams = await streams_under_way(stack)
            assert metric(stack, "distserve_worker_running_requests", instance="colocated-0", role="colocated") > 0
            os.kill(leaving.proc.pid, signal.SIGTERM)
            texts = await asyncio.wait_for(streams, 120)
            assert texts == undisturbed
            assert metric(stack, "distserve_migrations_total", role="colocated") >= 1
            assert leaving.proc.wait(30) == 0
            assert await asyncio.to_thread(wait_until, lambda: kv_in_use(stack.url) == 0.0)
        finally:
            stack.stop()

"""Request state lands in Redis batched, merged per request, with a TTL, and reads back as a timeline."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import redis.asyncio as aioredis

from shared.servers import RedisServer
from shared.state import (
    StateWriter,
    connect_redis,
    format_request,
    read_request,
    recent_requests,
    request_key,
    timeline,
)


async def test_writer_merges_fields_sets_ttl_and_indexes(redis_client: aioredis.Redis) -> None:
    writer = StateWriter(redis_client, ttl_s=60)
    writer.start()
    t0 = float(int(time.time()))  # now: the index lists the most recent arrivals first
    writer.update("r-state-1", status="queued", arrived=t0, prompt_tokens=5)
    writer.update("r-state-1", queued=t0 + 0.002, prefill_instance="prefill-0")
    writer.update("r-state-1", prefill_start=t0 + 0.01, prefill_end=t0 + 0.05, first_token=t0 + 0.051)
    writer.update("r-state-1", status="finished", finish=t0 + 0.3, output_tokens=8, finish_reason="length")
    await writer.close()

    state = await read_request(redis_client, "r-state-1")
    assert state is not None
    assert state["status"] == "finished" and state["prompt_tokens"] == "5"
    assert state["prefill_instance"] == "prefill-0"
    assert 0 < await redis_client.ttl(request_key("r-state-1")) <= 60
    assert "r-state-1" in await recent_requests(redis_client)
    phases = [phase for phase, _, _ in timeline(state)]
    assert phases == ["arrived", "queued", "prefill_start", "prefill_end", "first_token", "finish"]
    text = format_request("r-state-1", state)
    assert "prefill_end" in text and "status=finished" in text and "300.0" in text


async def test_unknown_request_reads_none(redis_client: aioredis.Redis) -> None:
    assert await read_request(redis_client, "no-such-request") is None


async def test_buffer_is_bounded_and_drops_count() -> None:
    unreachable = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    writer = StateWriter(unreachable, ttl_s=60, max_buffer=2)
    for i in range(5):
        writer.update(f"r{i}", arrived=1.0)
    assert writer.dropped == 3 and len(writer.pending) == 2
    await writer.close()  # an unreachable Redis costs dropped state, never an exception
    await unreachable.aclose()


async def test_writes_during_an_outage_are_kept_and_land_when_redis_is_back() -> None:
    with RedisServer() as server:
        client = connect_redis(server.url)
        writer = StateWriter(client, ttl_s=60, window_s=0.001)
        writer.start()
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)  # Redis is down (restarted on the same port below)
        writer.update("r1", arrived=1.0, status="queued")
        await asyncio.sleep(0.5)  # a few failed flushes
        writer.update("r1", status="finished")  # newer fields merge over the ones being retried
        assert writer.written == 0 and writer.dropped == 0
        await asyncio.to_thread(server.restart)
        for _ in range(100):
            if writer.written:
                break
            await asyncio.sleep(0.1)
        assert await read_request(client, "r1") == {"arrived": "1.0", "status": "finished"}
        await writer.close()
        await client.aclose()

"""NATS and Redis outages under load, with the real servers killed (SIGKILL by PID) and restarted on
their ports: streams in flight finish with the text of an undisturbed run, services re-register, no
KV is left in use, and Redis gets the state of requests served while it was down."""

from __future__ import annotations

import asyncio
import os
import signal

from shared.servers import NatsServer, RedisServer
from tests.services.conftest import request_states, start_stack
from tests.services.test_migration import stream_all, streams_under_way
from tests.services.test_stack import kv_in_use, metric, wait_until


async def test_nats_killed_mid_stream_and_back_2_s_later(redis_server: RedisServer) -> None:
    """Two decode workers: a request whose tokens the dying server lost moves to the other one."""
    with NatsServer() as nats:
        stack = start_stack(nats, redis_server, decode_instances=2)
        try:
            undisturbed, streams = await streams_under_way(stack)
            assert nats.pid is not None
            os.kill(nats.pid, signal.SIGKILL)
            await asyncio.sleep(2.0)
            await asyncio.to_thread(nats.restart)
            assert await asyncio.wait_for(streams, 120) == undisturbed
            assert metric(stack, "distserve_workers_alive", role="decode") == 2  # nobody was taken for dead
            assert await asyncio.to_thread(wait_until, lambda: kv_in_use(stack.url) == 0.0)
            assert await stream_all(stack) == undisturbed  # and serving goes on
        finally:
            stack.stop()


async def test_redis_killed_mid_stream_serving_goes_on_and_state_lands_when_it_is_back() -> None:
    with NatsServer() as nats, RedisServer() as redis_server:
        stack = start_stack(nats, redis_server)
        try:
            undisturbed, streams = await streams_under_way(stack)
            assert redis_server.pid is not None
            os.kill(redis_server.pid, signal.SIGKILL)  # its data goes with it: only what is written after counts
            assert await asyncio.wait_for(streams, 120) == undisturbed
            during = await stream_all(stack)  # served entirely while Redis is down
            assert during == undisturbed
            await asyncio.to_thread(redis_server.restart)
            async def finished() -> int:
                return sum(1 for s in await request_states(redis_server.url) if s.get("status") == "finished")

            for _ in range(100):  # the writers retry with backoff (5 s at most)
                if await finished() >= len(during):
                    break
                await asyncio.sleep(0.2)
            assert await finished() >= len(during)
            assert await asyncio.to_thread(wait_until, lambda: kv_in_use(stack.url) == 0.0)
        finally:
            stack.stop()

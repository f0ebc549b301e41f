"""Whole stacks for the service tests: real worker and gateway processes on loopback.

Each stack is what `distserve up` starts (services/launcher.Stack), pointed at the session's
nats-server and redis-server, with a small KV pool, on a free gateway port. Stopped by PID.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.launcher import Stack
from shared.config import load_settings
from shared.servers import NatsServer, RedisServer, free_port
from shared.state import read_request, recent_requests

KV_GIB = 0.1  # 1456 blocks at 1 GiB: ~145 here, plenty for the tests and quick to allocate
# Not auto (chosen per CPU and role): the tests' expected outputs then hold on every CPU CI runs on.
PRECISION = {"dtype": "float32", "weights": "fp16"}


def start_stack(nats: NatsServer, redis: RedisServer, **overrides: Any) -> Stack:
    engine = {"kv_cache_memory_gib": KV_GIB, **PRECISION}
    settings = load_settings({
        "nats_url": nats.url, "redis_url": redis.url,
        "gateway": {"port": free_port(), **overrides.pop("gateway", {})},
        "prefill": engine, "decode": engine, "colocated": {**engine, **overrides.pop("colocated", {})},
        **overrides,
    })
    stack = Stack(settings, "WARNING", announce=False)
    try:
        stack.start()
        stack.wait_ready(300)
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="package")
def stack(nats_server: NatsServer, redis_server: RedisServer) -> Iterator[Stack]:
    """One prefill and one decode worker behind a gateway."""
    stack = start_stack(nats_server, redis_server)
    yield stack
    stack.stop()


async def request_states(redis_url: str, *request_ids: str) -> list[dict[str, str]]:
    """The Redis state of the given requests (of the 1000 most recent if none is given); absent ones left out."""
    client = aioredis.from_url(redis_url)
    try:
        ids = request_ids or tuple(await recent_requests(client, 1000))
        states = [await read_request(client, rid) for rid in ids]
        return [state for state in states if state is not None]
    finally:
        await client.aclose()

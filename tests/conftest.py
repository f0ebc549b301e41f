"""Real infrastructure for tests: nats-server and redis-server processes on free loopback ports.

One of each per test session; every test gets its own clients. The servers are stopped by PID at
the end of the session (tests/test_no_leftovers checks that nothing stays behind).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from shared.servers import NatsServer, RedisServer


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server  # type: ignore[misc]


@pytest.fixture
async def nats_client(nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()

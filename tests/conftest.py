"""Real infrastructure for tests: nats-server and redis-server processes on free loopback ports.

One of each per test session; every test gets its own clients. The servers are stopped by PID at
the end of the session, and the session fails if any process it started is still running then.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

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


def _live_children(pid: int) -> list[str]:
    """Descendants of `pid` that are still running (not zombies): 'PID command' each."""
    found: list[str] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                child = int(stat.parent.name)
                command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found += [f"{child} {command[:120]}", *_live_children(child)]
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every server and worker a test started must be stopped by the end of the run."""
    leftovers = _live_children(os.getpid())
    if leftovers:
        print("\nprocesses left running by the tests:\n  " + "\n  ".join(leftovers))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

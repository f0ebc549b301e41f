"""A started pair of transports (server, client) of one kind, closed after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from shared.transfer import KVTransport, create_transport


@asynccontextmanager
async def transport_pair(name: str) -> AsyncIterator[tuple[KVTransport, KVTransport]]:
    server, client = create_transport(name), create_transport(name)
    await server.start()
    await client.start()
    try:
        yield server, client
    finally:
        await client.close()
        await server.close()
        await server.close()  # safe twice

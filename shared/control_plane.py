"""Connecting to NATS, the control plane: every service the same way.

The client reconnects forever (0.5 s apart) and buffers what is published meanwhile; subscriptions come
back by themselves, and workers re-register through their next heartbeat. What the logs get is one line
per change of state (lost, back, closed), not nats-py's default of a traceback per failed reconnect
attempt (45 of them in a 2 s outage); each failed attempt is a DEBUG line.

The first connection waits at most `FIRST_CONNECT_S` for a server (one that starts a little later, as
in compose, is fine): past it the service fails with a clear error instead of waiting forever, deaf to
SIGTERM (uvicorn does not look at signals while the gateway starts), and its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging

import nats
from nats.aio.client import Client as NATS

from shared.credentials import redact

log = logging.getLogger("distserve.nats")

FIRST_CONNECT_S = 30.0


async def connect_nats(url: str, name: str) -> NATS:
    client: NATS | None = None

    async def on_error(exc: Exception) -> None:
        log.debug("%s: NATS: %s", name, exc or type(exc).__name__)

    async def on_disconnected() -> None:
        if client is not None and client.is_closed:  # our own close: closed_cb says so
            return
        log.warning("%s: lost the NATS connection; reconnecting", name)

    async def on_reconnected() -> None:
        server = client.connected_url if client is not None else None  # host and port only: never credentials
        log.warning("%s: NATS connection back (%s)", name, f"{server.hostname}:{server.port}" if server else "?")

    async def on_closed() -> None:
        log.info("%s: NATS connection closed", name)

    try:
        client = await asyncio.wait_for(nats.connect(
            url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=on_error,
            disconnected_cb=on_disconnected, reconnected_cb=on_reconnected, closed_cb=on_closed), FIRST_CONNECT_S)
    except TimeoutError:
        raise ConnectionError(f"{name}: no NATS server answered at {redact(url)} "
                              f"within {FIRST_CONNECT_S:g} s") from None
    log.info("%s: connected to NATS at %s", name, redact(url))
    return client

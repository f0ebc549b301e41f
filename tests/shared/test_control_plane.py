"""A NATS outage as every service sees it: the client reconnects to the restarted server, its subscriptions
work again, messages published during the outage arrive, and the log has one line per state change."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest
from nats.aio.msg import Msg

from shared.control_plane import connect_nats
from shared.servers import NatsServer


async def test_a_restarted_nats_server_is_reconnected_with_one_line_per_change(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="distserve.nats")
    with NatsServer.with_password() as server:
        nc = await connect_nats(server.url, "test")
        received: list[bytes] = []

        async def on_ping(msg: Msg) -> None:
            received.append(msg.data)

        await nc.subscribe("ping", cb=on_ping)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        await asyncio.sleep(1.5)  # several failed reconnect attempts
        await nc.publish("ping", b"during")  # buffered by the client
        await asyncio.to_thread(server.restart)  # the same port
        for _ in range(100):
            if received == [b"during"]:
                break
            await asyncio.sleep(0.05)
        await nc.publish("ping", b"after")
        await nc.flush(timeout=5)
        await asyncio.sleep(0.1)
        assert received == [b"during", b"after"]
        await nc.close()
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [r.getMessage() for r in lines] == [
        f"test: connected to NATS at nats://***@127.0.0.1:{server.port}",  # never the password
        "test: lost the NATS connection; reconnecting", f"test: NATS connection back (127.0.0.1:{server.port})",
        "test: NATS connection closed"]
    assert not any(r.exc_info for r in caplog.records)
    assert any(r.levelno == logging.DEBUG for r in caplog.records)  # the failed attempts, quietly

"""A NATS outage as every service sees it: the client reconnects to the restarted server, its subscriptions
work again, messages published during the outage arrive, and the log has one line per state change."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from nats.aio.msg import Msg

from shared import control_plane
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


async def test_no_server_at_all_is_a_clear_error_after_the_first_connect_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control_plane, "FIRST_CONNECT_S", 0.5)
    with pytest.raises(ConnectionError, match=r"no NATS server answered at nats://\*\*\*@127\.0\.0\.1:1 within 0\.5 s"):
        await connect_nats("nats://user:hidden@127.0.0.1:1", "test")  # the password never in the message


def test_a_worker_still_starting_stops_on_sigterm() -> None:
    """NATS unreachable: the worker waits for it, and SIGTERM ends the wait (it used to be ignored)."""
    worker = subprocess.Popen([sys.executable, "-m", "services.cli", "decode", "--engine", "emulated", "--model",
                               "opt-13b", "--nats-url", "nats://127.0.0.1:1", "--instance-id", "decode-w"],
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # it is waiting for NATS
        assert worker.poll() is None
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
        assert "stopped before it was ready" in (worker.stderr.read() if worker.stderr else "")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

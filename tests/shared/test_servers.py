"""The embedded servers start on loopback, answer, and leave no process behind."""

from __future__ import annotations

import nats
import redis

from shared.servers import NatsServer, RedisServer, process_alive


async def test_nats_server_starts_with_jetstream_and_stops() -> None:
    with NatsServer() as server:
        pid = server.pid
        assert pid is not None and server.url.startswith("nats://127.0.0.1:")
        client = await nats.connect(server.url)
        js = client.jetstream()
        await js.add_stream(name="probe", subjects=["probe.>"])
        ack = await js.publish("probe.one", b"x")
        assert ack.seq == 1
        await client.close()
    assert not process_alive(pid)


def test_redis_server_starts_and_stops() -> None:
    server = RedisServer().start()
    pid = server.pid
    assert pid is not None
    client = redis.Redis.from_url(server.url)
    client.set("k", "v")
    assert client.get("k") == b"v"
    client.close()
    server.stop()
    server.stop()  # idempotent
    assert not process_alive(pid)


def test_two_servers_get_different_ports() -> None:
    with RedisServer() as a, RedisServer() as b:
        assert a.port != b.port

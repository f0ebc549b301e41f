"""The gateway's dispatcher against a real NATS server: admission, routing, migration, dead workers.

Each test has a nats-server of its own: on the session's, the workers of the package's stack would
report too, and dispatch (or a migration) could pick them."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS

from services.gateway.dispatch import Dispatcher
from services.gateway.errors import APIError
from services.gateway.metrics import GatewayMetrics
from services.gateway.registry import Registry
from shared import protocol as p
from shared.config import load_settings
from shared.servers import NatsServer
from shared.state import StateWriter
from shared.telemetry import Tracing


def _worker(instance_id: str, role: p.Role, queued: int = 0) -> p.WorkerInfo:
    return p.WorkerInfo(instance_id=instance_id, role=role, model="m", max_model_len=256, pid=os.getpid(),
                        host="h", started_at=1.0, seq=1, load=p.WorkerLoad(queued_tokens=queued))


@pytest.fixture
async def nats_client() -> AsyncIterator[NATS]:
    with NatsServer() as server:
        client = await nats.connect(server.url)
        yield client
        await client.close()


def _dispatcher(nc: NATS, dead_after_s: float = 0.5, **gateway: object) -> Dispatcher:
    settings = load_settings({"gateway": gateway, "worker": {"dead_after_s": dead_after_s}})
    registry = Registry(settings.worker.dead_after_s)
    return Dispatcher(settings, nc, StateWriter(None, 60), Tracing(settings.telemetry, "test"),
                      GatewayMetrics(registry), registry, "m")


async def test_full_admission_queue_is_429_with_retry_after(nats_client: NATS) -> None:
    dispatcher = _dispatcher(nats_client, max_pending=2, retry_after_s=3)
    dispatcher.registry.update(_worker("p", "prefill"))
    dispatcher.registry.update(_worker("d", "decode"))
    sampling = p.SamplingParams(max_tokens=4)
    await dispatcher.submit([1, 2, 3], sampling, "cmpl")
    await dispatcher.submit([1, 2, 3], sampling, "cmpl")
    with pytest.raises(APIError) as excinfo:
        await dispatcher.submit([1, 2, 3], sampling, "cmpl")
    assert excinfo.value.status == 429 and excinfo.value.headers == {"Retry-After": "3"}
    await dispatcher.close()


async def test_requests_go_to_the_least_loaded_prefill_worker(nats_client: NATS) -> None:
    dispatcher = _dispatcher(nats_client)
    dispatcher.registry.update(_worker("busy", "prefill", queued=5000))
    dispatcher.registry.update(_worker("idle", "prefill", queued=10))
    dispatcher.registry.update(_worker("d", "decode"))
    received: list[str] = []

    async def on_submit(msg: object) -> None:
        received.append(p.decode(p.PrefillRequest, msg.data).request_id)  # type: ignore[attr-defined]

    await nats_client.subscribe(p.Subjects.submit("prefill", "idle"), cb=on_submit)
    flight = await dispatcher.submit(list(range(100)), p.SamplingParams(), "cmpl")
    await nats_client.flush()
    for _ in range(500):  # the message is on its way back from the server: wait for it, not a fixed time
        if received:
            break
        await asyncio.sleep(0.02)
    assert received == [flight.request_id] and flight.instance == "idle"
    await dispatcher.close()


async def test_a_silent_worker_with_no_spare_fails_its_requests_instead_of_hanging(nats_client: NATS) -> None:
    dispatcher = _dispatcher(nats_client)
    await dispatcher.start()
    dispatcher.registry.update(_worker("p", "prefill"))
    dispatcher.registry.update(_worker("d", "decode"))
    flight = await dispatcher.submit([1, 2, 3], p.SamplingParams(), "cmpl")  # nobody answers, no more heartbeats
    started = time.monotonic()
    with pytest.raises(APIError) as excinfo:
        async for _ in dispatcher.stream(flight):
            pass
    message = excinfo.value.message  # no other prefill worker to migrate to
    assert excinfo.value.status == 503 and "stopped reporting" in message and "no live prefill worker" in message
    assert excinfo.value.headers == {"Retry-After": "1"}
    assert time.monotonic() - started < 10
    await dispatcher.close()


async def test_a_request_past_its_timeout_ends_with_504(nats_client: NATS) -> None:
    dispatcher = _dispatcher(nats_client, request_timeout_s=0.2)
    dispatcher.registry.update(_worker("p", "prefill"))
    dispatcher.registry.update(_worker("d", "decode"))
    flight = await dispatcher.submit([1, 2, 3], p.SamplingParams(), "cmpl")  # the worker stays alive but never answers
    with pytest.raises(APIError) as excinfo:
        async for _ in dispatcher.stream(flight):
            pass
    assert excinfo.value.status == 504 and flight.done and not dispatcher.inflight
    await dispatcher.close()


def _handle(request_id: str, prompt: list[int], first: int) -> p.KVHandle:
    meta = p.KVMeta(request_id=request_id, prompt_token_ids=prompt, output_token_ids=[first],
                    params=p.SamplingParams(max_tokens=16), num_kv_tokens=len(prompt), num_blocks=1, block_size=16,
                    block_nbytes=1024, output_text="A", num_emitted_chars=1)
    return p.KVHandle(prefill_instance="p", transport="tcp", address="tcp://127.0.0.1:1", transfer_id=request_id,
                      nbytes=1024, meta=meta)


async def test_tokens_lost_in_transit_migrate_the_request_to_a_recompute(nats_client: NATS) -> None:
    dispatcher = _dispatcher(nats_client)
    await dispatcher.start()
    for instance, role in (("p", "prefill"), ("d1", "decode"), ("d2", "decode")):
        dispatcher.registry.update(_worker(instance, role))
    sent: list[tuple[str, p.DecodeRequest]] = []

    async def on_decode(msg: object) -> None:
        sent.append((msg.subject, p.decode(p.DecodeRequest, msg.data)))  # type: ignore[attr-defined]

    await nats_client.subscribe(p.Subjects.all_submits("decode"), cb=on_decode)
    flight = await dispatcher.submit([1, 2, 3], p.SamplingParams(max_tokens=16), "cmpl")

    async def tokens(instance: str, *events: p.TokenEvent) -> None:
        await nats_client.publish(dispatcher.inbox, p.TokenBatch(instance_id=instance, events=list(events)).encode())
        await nats_client.flush()

    async def until(check: object) -> None:
        for _ in range(250):
            if check():  # type: ignore[operator]
                return
            await asyncio.sleep(0.02)
        pytest.fail("timed out")

    rid = flight.request_id
    await tokens("p", p.TokenEvent(request_id=rid, token_id=65, text="A", num_output_tokens=1,
                                   kv=_handle(rid, [1, 2, 3], 65)))
    await until(lambda: len(sent) == 1)
    first = flight.instance
    await tokens(first, p.TokenEvent(request_id=rid, token_id=66, text="B", num_output_tokens=2))
    await tokens("elsewhere", p.TokenEvent(request_id=rid, token_id=99, text="?", num_output_tokens=3))  # stale
    await tokens(first, p.TokenEvent(request_id=rid, token_id=68, text="D", num_output_tokens=4))  # 3 never came
    await until(lambda: len(sent) == 2)
    subject, resumed = sent[1]
    assert subject == p.Subjects.submit("decode", "d2" if first == "d1" else "d1") and resumed.recompute
    assert resumed.kv.meta.output_token_ids == [65, 66] and resumed.kv.meta.num_emitted_chars == 2
    assert resumed.kv.meta.num_kv_tokens == 4 and flight.migrations == 1
    texts = []
    while not flight.events.empty():
        texts.append(flight.events.get_nowait().text)
    assert texts == ["A", "B"]
    await dispatcher.close()


async def test_a_lost_nats_connection_prunes_nobody_and_ends_requests_after_the_bound() -> None:
    from shared.control_plane import connect_nats

    with NatsServer() as server:
        nc = await connect_nats(server.url, "test")
        dispatcher = _dispatcher(nc, nats_outage_s=1.5)
        await dispatcher.start()
        dispatcher.registry.update(_worker("p", "prefill"))
        dispatcher.registry.update(_worker("d", "decode"))
        flight = await dispatcher.submit([1, 2, 3], p.SamplingParams(), "cmpl")
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(APIError) as excinfo:
            async for _ in dispatcher.stream(flight):
                pass
        assert "unreachable" in excinfo.value.message and 1.5 < time.monotonic() - started < 5
        assert {i.instance_id for i in dispatcher.registry.instances.values()} == {"p", "d"}  # nobody pruned
        with pytest.raises(APIError, match="unreachable"):
            await dispatcher.submit([1, 2, 3], p.SamplingParams(), "cmpl")
        assert dispatcher.control_plane_down
        await asyncio.to_thread(server.restart)
        for _ in range(200):
            if not dispatcher.control_plane_down:  # the prune loop saw the connection back...
                break
            await asyncio.sleep(0.02)
        assert dispatcher.registry.alive("prefill")  # ...and gave the workers a fresh dead_after_s
        await dispatcher.close()
        await nc.close()


async def test_a_request_its_worker_does_not_have_is_sent_again(nats_client: NATS) -> None:
    """NATS lost the submit (a server that died with it): the worker's heartbeats do not list the request."""
    dispatcher = _dispatcher(nats_client, dead_after_s=30)
    await dispatcher.start()
    for instance, role in (("p1", "prefill"), ("p2", "prefill"), ("d", "decode")):
        dispatcher.registry.update(_worker(instance, role))
    submits: list[str] = []

    async def on_submit(msg: object) -> None:
        submits.append(msg.subject)  # type: ignore[attr-defined]

    await nats_client.subscribe(p.Subjects.all_submits("prefill"), cb=on_submit)
    flight = await dispatcher.submit([1, 2, 3], p.SamplingParams(), "cmpl")
    first = flight.instance

    async def heartbeat(seq: int, serving: list[str], age_s: float = 0.0) -> None:
        info = _worker(first, "prefill").model_copy(
            update={"seq": seq, "serving": serving, "sent_at": time.time() - age_s})
        await nats_client.publish(p.Subjects.heartbeat, info.encode())
        await nats_client.flush()
        await asyncio.sleep(0.1)

    await heartbeat(2, [])  # too soon to tell: the submit may still be on its way
    await heartbeat(3, [])
    assert flight.instance == first and flight.unlisted == 0
    await asyncio.sleep(2 * 0.5)  # the settling time: two heartbeat intervals
    await heartbeat(4, [], age_s=5)  # reports built before the request was sent, read late by a busy gateway
    await heartbeat(5, [], age_s=5)
    assert flight.instance == first and flight.unlisted == 0
    await heartbeat(6, [flight.request_id])  # listed: all is well
    await heartbeat(7, [])
    assert flight.instance == first and flight.unlisted == 1
    await heartbeat(8, [])  # the second miss in a row
    for _ in range(100):
        if len(submits) == 2:
            break
        await asyncio.sleep(0.02)
    # Sent again to the same worker: lost, it takes it now; only late, it drops the copy.
    assert submits == [p.Subjects.submit("prefill", first)] * 2
    assert flight.instance == first and flight.migrations == 1
    await dispatcher.close()

"""The gateway's dispatcher against a real NATS server: admission, routing, failure of dead workers."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from nats.aio.client import Client as NATS

from services.gateway.dispatch import Dispatcher
from services.gateway.errors import APIError
from services.gateway.metrics import GatewayMetrics
from services.gateway.registry import Registry
from shared import protocol as p
from shared.config import load_settings
from shared.state import StateWriter
from shared.telemetry import Tracing


def _worker(instance_id: str, role: p.Role, queued: int = 0) -> p.WorkerInfo:
    return p.WorkerInfo(instance_id=instance_id, role=role, model="m", max_model_len=256, pid=os.getpid(),
                        host="h", started_at=1.0, seq=1, load=p.WorkerLoad(queued_tokens=queued))


def _dispatcher(nc: NATS, **gateway: object) -> Dispatcher:
    settings = load_settings({"gateway": gateway, "worker": {"dead_after_s": 0.5}})
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

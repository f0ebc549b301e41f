"""Changing a running deployment without losing a request: a drained worker finishes its streams, takes no
new ones and leaves; the actuator follows the online planner's plans (here, plans published by the test)
by starting workers and draining the surplus."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import nats
import openai
import redis

from services.launcher import Stack
from services.planner.actuator import SCALING_KEY
from services.planner.deployment import PlannedDeployment
from shared import protocol as p
from shared.config import load_settings
from shared.servers import NatsServer, RedisServer, free_port
from tests.services.conftest import request_states, start_stack
from tests.services.test_migration import streams_under_way
from tests.services.test_stack import kv_in_use, metric, wait_until


async def publish(nats_url: str, subject: str, message: p.Message) -> None:
    nc = await nats.connect(nats_url)
    try:
        await nc.publish(subject, message.encode())
        await nc.flush()
    finally:
        await nc.close()


async def test_a_drained_worker_finishes_its_streams_and_leaves_without_a_migration(
        redis_server: RedisServer) -> None:
    with NatsServer() as nats_server:
        stack = start_stack(nats_server, redis_server, decode_instances=2)
        drained = next(c for c in stack.children if c.name == "decode-0")
        try:
            undisturbed, streams = await streams_under_way(stack)
            assert metric(stack, "distserve_worker_running_requests", instance="decode-0", role="decode") > 0
            await publish(nats_server.url, p.Subjects.drain("decode-0"), p.WorkerDrain(instance_id="decode-0"))
            stack.retire("decode-0", time.monotonic())
            assert await asyncio.to_thread(wait_until, lambda: metric(
                stack, "distserve_worker_draining", instance="decode-0", role="decode") == 1.0)
            texts = await asyncio.wait_for(streams, 120)
            assert texts == undisturbed
            assert await asyncio.to_thread(drained.proc.wait, 30) == 0
            assert metric(stack, "distserve_migrations_total", role="decode") == 0
            assert stack.supervise(time.monotonic()) and "decode-0" not in [c.name for c in stack.children]
            assert await asyncio.to_thread(wait_until, lambda: metric(
                stack, "distserve_workers_alive", role="decode") == 1)
            assert await streams_under_way(stack)  # the rest serve on
            assert await asyncio.to_thread(wait_until, lambda: kv_in_use(stack.url) == 0.0)
        finally:
            stack.stop()


async def test_the_actuator_starts_and_drains_workers_to_follow_the_plans(redis_server: RedisServer) -> None:
    plan = PlannedDeployment.model_validate({
        "model": "opt-13b", "hardware": "a100-80g", "profile": "reference:distserve", "rate": 2,
        "prefill": {"tp": 1, "instances": 1}, "decode": {"tp": 1, "instances": 1}, "kv_bandwidth_gbps": 2400,
        "slo": {"ttft": 0.25, "tpot": 0.1}})
    with NatsServer() as nats_server:
        settings = load_settings({
            **plan.overrides(), "nats_url": nats_server.url, "redis_url": redis_server.url,
            "gateway": {"port": free_port()},
            "autoscale": {"enabled": True, "cooldown_s": 0, "scale_down_after_s": 1}})
        stack = Stack(settings, "WARNING", announce=False, plan=plan)
        try:
            stack.start()
            stack.wait_ready(120)
            assert "planner" in [c.name for c in stack.children]  # the online planner runs beside it

            def follow(until: object) -> bool:
                def once() -> bool:
                    assert stack.supervise(time.monotonic())
                    return bool(until())  # type: ignore[operator]
                return wait_until(once, 60)

            def decode_alive() -> float:
                return metric(stack, "distserve_workers_alive", role="decode")

            await publish(nats_server.url, p.Subjects.plan, plan_message(decode=2))
            assert await asyncio.to_thread(follow, lambda: decode_alive() == 2)
            reply = httpx.post(f"{stack.url}/v1/completions", timeout=30, json={
                "model": "opt-13b", "prompt": [100] * 50, "max_tokens": 4, "ignore_eos": True})
            assert reply.status_code == 200
            await publish(nats_server.url, p.Subjects.plan, plan_message(decode=1))
            assert await asyncio.to_thread(follow, lambda: "decode-1" not in [c.name for c in stack.children])
            assert await asyncio.to_thread(wait_until, lambda: decode_alive() == 1)
            assert metric(stack, "distserve_scaling_actions_total", action="start", role="decode") == 1
            assert metric(stack, "distserve_scaling_actions_total", action="drain", role="decode") == 1
            client = redis.Redis.from_url(redis_server.url)
            recorded = [json.loads(e) for e in client.lrange(SCALING_KEY, 0, 1)]
            client.close()
            assert [(e["kind"], e["instance"]) for e in recorded] == [("drain", "decode-1"), ("start", "decode-1")]
        finally:
            stack.stop()


def plan_message(decode: int) -> p.PlanMessage:
    return p.PlanMessage(model="opt-13b", hardware="a100", rate=2, gpus=1 + decode,
                         prefill=p.PhaseShape(tp=1, pp=1, instances=1, gpus=1),
                         decode=p.PhaseShape(tp=1, pp=1, instances=decode, gpus=decode),
                         goodput_per_gpu=1.0, reason="a synthetic shift", observed_rate=2, at=time.time())


async def test_a_prefill_worker_that_joins_takes_its_share_of_the_queue(redis_server: RedisServer) -> None:
    """A burst queues on one emulated prefill worker; a second joins: the newest requests not yet started
    move to it (withdrawn, then migrated), the rest stay, and every request completes."""
    prompt = [100 + i % 1000 for i in range(1800)]  # one prompt per 2048-token prefill batch
    with NatsServer() as nats_server:
        stack = start_stack(nats_server, redis_server, engine="emulated", model="opt-13b")
        try:
            api = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=120)
            started = time.time()  # the Redis server is shared: other tests' requests are there too
            sends = [asyncio.ensure_future(api.completions.create(
                model="opt-13b", prompt=prompt, max_tokens=2, extra_body={"ignore_eos": True})) for _ in range(30)]
            assert await asyncio.to_thread(wait_until, lambda: metric(
                stack, "distserve_worker_waiting_requests", instance="prefill-0", role="prefill") >= 20)
            stack.add_worker("prefill")
            replies = await asyncio.wait_for(asyncio.gather(*sends), 120)
            assert all(r.choices[0].finish_reason == "length" for r in replies)
            ours = [s for s in await request_states(stack.settings.redis_url or "")
                    if s.get("model") == "opt-13b" and float(s["arrived"]) >= started]
            moved = [s for s in ours if s["prefill_instance"] == "prefill-1"]
            assert len(ours) == 30 and 5 <= len(moved) <= 15, len(moved)
            assert metric(stack, "distserve_migrations_total", role="prefill") == len(moved)
        finally:
            stack.stop()

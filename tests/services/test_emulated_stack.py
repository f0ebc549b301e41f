"""The emulated GPU engine through the real stack (gateway, NATS, KV transport, Redis): one request's
phases take the latency profile's times, every report says it is emulated, and `up --plan` starts
what a plan says."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import yaml

from services.cli import build_parser
from services.launcher import Stack, up_settings
from services.planner.latency import reference_profiles
from shared.servers import NatsServer, RedisServer, free_port
from tests.services.conftest import request_states, start_stack
from tests.services.test_stack import kv_in_use, metric, wait_until

PROMPT_TOKENS = [100 + i % 1000 for i in range(600)]
OUTPUT_TOKENS = 24


async def test_one_request_takes_the_profiles_ttft_and_tpot(redis_server: RedisServer) -> None:
    step = reference_profiles("distserve")["opt-13b"].step(1)
    prefill_s = step.prefill_time(len(PROMPT_TOKENS), len(PROMPT_TOKENS) ** 2)
    # Decode rounds of one request whose context grows from 601 to 600 + OUTPUT_TOKENS positions
    rounds = [step.decode_round(1, len(PROMPT_TOKENS) + 1 + i) for i in range(1, OUTPUT_TOKENS)]
    tpot_s = sum(rounds) / len(rounds)
    with NatsServer() as nats:
        stack = start_stack(nats, redis_server, engine="emulated", model="opt-13b")
        try:
            metrics = httpx.get(f"{stack.url}/metrics").text
            assert 'distserve_worker_info{engine="emulated-a100",instance="decode-0",model="opt-13b",pp="1",' \
                   'role="decode",tp="1"} 1.0' in metrics
            api = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=60)
            assert [m.id for m in (await api.models.list()).data] == ["opt-13b"]
            started = time.perf_counter()
            arrivals: list[float] = []
            stream = await api.completions.create(model="opt-13b", prompt=PROMPT_TOKENS, max_tokens=OUTPUT_TOKENS,
                                                  extra_body={"ignore_eos": True}, stream=True)
            text = ""
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    arrivals.append(time.perf_counter())
                    text += chunk.choices[0].text
            assert text.startswith(" Emulated tokens:")
            ttft = arrivals[0] - started
            tpot = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
            # The stack adds its own overhead (dispatch, the hand-off, streaming) to the modelled time: a few
            # milliseconds per token on loopback; never less than the model.
            assert prefill_s <= ttft <= prefill_s + 0.1, (ttft, prefill_s)
            assert tpot_s <= tpot * 1.02 and tpot <= tpot_s * 1.3 + 0.005, (tpot, tpot_s)
            assert wait_until(lambda: kv_in_use(stack.url) == 0.0)
            ours = [s for s in await request_states(stack.settings.redis_url or "") if s.get("model") == "opt-13b"]
            state = max(ours, key=lambda s: float(s["arrived"]))
            assert state["status"] == "finished" and state["prefill_instance"] == "prefill-0"
            assert float(state["prefill_end"]) - float(state["prefill_start"]) >= prefill_s
        finally:
            stack.stop()



def test_up_plan_starts_the_planned_instances(redis_server: RedisServer, tmp_path: Path) -> None:
    plan = {"model": "opt-13b", "hardware": "a100-80g", "profile": "reference:distserve", "rate": 4,
            "prefill": {"tp": 1, "pp": 3, "instances": 1}, "decode": {"tp": 2, "pp": 1, "instances": 2},
            "kv_bandwidth_gbps": 200}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    with NatsServer() as nats:
        args = build_parser(with_bench=False).parse_args(
            ["up", "--plan", str(tmp_path / "plan.yaml"), "--nats-url", nats.url, "--redis-url", redis_server.url,
             "--port", str(free_port())])
        settings, plan = up_settings(args)
        stack = Stack(settings, "WARNING", announce=False, plan=plan)
        try:
            stack.start()
            stack.wait_ready(120)
            assert wait_until(lambda: metric(stack, "distserve_workers_alive", role="decode") == 2)
            info = [line for line in httpx.get(f"{stack.url}/metrics").text.splitlines()
                    if line.startswith("distserve_worker_info{")]
            assert sorted(info) == [
                'distserve_worker_info{engine="emulated-a100",instance="decode-0",model="opt-13b",pp="1",role="decode",'
                'tp="2"} 1.0',
                'distserve_worker_info{engine="emulated-a100",instance="decode-1",model="opt-13b",pp="1",role="decode",'
                'tp="2"} 1.0',
                'distserve_worker_info{engine="emulated-a100",instance="prefill-0",model="opt-13b",pp="3",'
                'role="prefill",tp="1"} 1.0']
            reply = httpx.post(f"{stack.url}/v1/completions", timeout=30, json={
                "model": "opt-13b", "prompt": PROMPT_TOKENS, "max_tokens": 8, "ignore_eos": True}).json()
            assert reply["choices"][0]["text"] == " Emulated tokens: the step took the"
        finally:
            stack.stop()

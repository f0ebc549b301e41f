"""The disaggregated stack end to end: OpenAI clients in, tokens out, KV freed, errors mapped."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import time

import httpx
import openai
import pytest

from services.launcher import Stack
from shared.config import load_settings
from shared.cpus import available_cpus
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.servers import NatsServer, RedisServer, free_port, process_alive
from tests.engine.conftest import make_engine, move_kv
from tests.services.conftest import KV_GIB, PRECISION, start_stack

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The three primary colors are"


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=120)


def metric(stack: Stack, name: str, **labels: str) -> float:
    """One sample of the gateway's /metrics (0 if absent)."""
    text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}{{{want}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def kv_in_use(url: str) -> float:
    """KV usage summed over every live worker, from the gateway at `url`."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("distserve_worker_kv_usage_ratio{"))


def wait_until(check: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_models_and_health(stack: Stack) -> None:
    assert [m.id for m in client(stack).models.list()] == [MODEL]
    health = httpx.get(f"{stack.url}/health").json()
    assert health == {"status": "ok", "workers": {"prefill": 1, "decode": 1, "colocated": 0}}


def test_chat_answers_and_reports_usage(stack: Stack) -> None:
    reply = client(stack).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens > 1


def test_streaming_chat_and_completion(stack: Stack) -> None:
    api = client(stack)
    chunks = list(api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                              max_tokens=6, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    pieces = [c.choices[0].text for c in api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10,
                                                                  temperature=0, stream=True)]
    whole = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    assert "".join(pieces) == whole.choices[0].text and whole.usage is not None
    assert whole.usage.completion_tokens == 10 and whole.choices[0].finish_reason == "length"


def greedy_in_process(prompts: list[str], max_tokens: int) -> list[str]:
    """What the engine run in this process answers greedily (ignore_eos): a stack must answer the same."""
    engine = LLMEngine(EngineConfig(kv_cache_memory_gib=0.05, role="colocated", weights="fp16"))
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), engine.tokenizer.encode(prompt),
                           SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    texts = [""] * len(prompts)
    while engine.has_unfinished():
        for out in engine.step():
            texts[int(out.request_id)] += out.text
    return texts


def test_greedy_output_matches_the_engine_in_process(stack: Stack) -> None:
    prompts = [PROMPT, "def fibonacci(n):", "Write a haiku about the sea."]
    api = client(stack)
    for prompt, expected in zip(prompts, greedy_in_process(prompts, 24), strict=True):
        got = api.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True})
        assert got.choices[0].text == expected


def test_seeded_sampling_is_reproducible(stack: Stack) -> None:
    api = client(stack)
    texts = {api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7).choices[0].text
             for _ in range(2)}
    assert len(texts) == 1


async def test_32_concurrent_streams_all_complete(stack: Stack) -> None:
    api = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=300)
    lengths = [4 + (i * 7) % 29 for i in range(32)]

    async def one(i: int) -> tuple[int, int]:
        stream = await api.completions.create(model=MODEL, prompt=f"Request {i}: tell me a story about {i} cats",
                                              max_tokens=lengths[i], stream=True, seed=i,
                                              extra_body={"ignore_eos": True},
                                              stream_options={"include_usage": True})
        usage = 0
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        return i, usage

    results = await asyncio.gather(*(one(i) for i in range(32)))
    await api.close()
    assert sorted(results) == [(i, lengths[i]) for i in range(32)]
    assert wait_until(lambda: kv_in_use(stack.url) == 0.0), "KV blocks still in use after every request finished"


def test_disconnect_mid_stream_frees_kv_on_both_sides(stack: Stack) -> None:
    aborted = metric(stack, "distserve_requests_total", outcome="aborted")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{stack.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        got = [line for line in (next(lines) for _ in range(8)) if line.startswith("data:")]
        assert got  # tokens are flowing: the request sits in the decode batch
        assert kv_in_use(stack.url) > 0 or wait_until(lambda: kv_in_use(stack.url) > 0, 2)
    assert wait_until(lambda: metric(stack, "distserve_requests_total", outcome="aborted") == aborted + 1)
    assert wait_until(lambda: kv_in_use(stack.url) == 0.0), "the aborted request's KV was not freed"


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"prompt": "hi", "max_tokens": 9000}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "n": 2}, 400, "n"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [99999999]}, 400, "prompt"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
])
def test_bad_completion_requests(stack: Stack, body: dict[str, object], status: int, param: str) -> None:
    response = httpx.post(f"{stack.url}/v1/completions", json={"model": MODEL, **body}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_bad_chat_requests_and_bodies(stack: Stack) -> None:
    url = f"{stack.url}/v1/chat/completions"
    long_prompt = "hello " * 9000  # beyond the 8192-token context, with no max_tokens: no room to generate
    response = httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.post(url, json={"model": MODEL, "messages": []}).status_code == 400
    assert httpx.post(url, json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).status_code == 400
    response = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_request_state_has_the_whole_timeline(stack: Stack, redis_server: RedisServer) -> None:
    import redis

    reply = client(stack).completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    r = redis.Redis.from_url(redis_server.url)
    key = f"distserve:request:{reply.id}"
    assert wait_until(lambda: r.hget(key, "status") == b"finished")
    state = {k.decode(): v.decode() for k, v in r.hgetall(key).items()}
    r.close()
    for phase in ("arrived", "queued", "prefill_start", "prefill_end", "first_token", "kv_transfer_start",
                  "kv_transfer_end", "decode_start", "finish"):
        assert phase in state, phase
    assert state["prefill_instance"] == "prefill-0" and state["decode_instance"] == "decode-0"
    assert int(state["kv_bytes"]) > 0 and state["output_tokens"] == "5"
    ucx_installed = importlib.util.find_spec("ucxx") is not None
    assert state["kv_transport"] == ("ucx" if ucx_installed else "tcp")  # the default: auto


def test_workers_record_their_steps_in_redis(stack: Stack, redis_server: RedisServer) -> None:
    """What `distserve profile --refit` fits: each worker's engine steps, pushed every second."""
    import redis

    reply = client(stack).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert reply.usage is not None
    r = redis.Redis.from_url(redis_server.url)

    def steps(role: str) -> list[dict[str, object]]:
        return [json.loads(x) for x in r.lrange(f"distserve:steps:{role}:{role}-0", 0, -1)]

    assert wait_until(lambda: any(s["prefill_lengths"] == [reply.usage.prompt_tokens] for s in steps("prefill")))
    assert wait_until(lambda: any(s["decode_batch"] >= 1 and not s["prefill_lengths"] for s in steps("decode")))
    r.close()


def test_colocated_stack_serves_and_stops_cleanly(redis_server: RedisServer) -> None:
    with NatsServer() as nats:  # its own control plane: its workers must not join the other stack
        stack = start_stack(nats, redis_server, mode="colocated", colocated={"chunked_prefill": True})
        pids = [c.proc.pid for c in stack.children]
        try:
            assert httpx.get(f"{stack.url}/health").json()["workers"]["colocated"] == 1
            reply = client(stack).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                temperature=0)
            assert "Paris" in (reply.choices[0].message.content or "")
        finally:
            stack.stop()
    assert not any(process_alive(pid) for pid in pids)


def test_bfloat16_prefill_feeds_a_float32_decode_worker(redis_server: RedisServer) -> None:
    """Each phase in its own dtype: the decode worker converts the pulled KV to its own."""
    with NatsServer() as nats:
        stack = start_stack(nats, redis_server,
                            prefill={"kv_cache_memory_gib": 0.1, "dtype": "bfloat16", "weights": "native"})
        try:
            messages = [{"role": "user", "content": "What is the capital of France?"}]
            reply = client(stack).chat.completions.create(model=MODEL, messages=messages,
                                                          temperature=0, max_tokens=20)
            assert reply.usage is not None and reply.usage.completion_tokens > 1  # decoded past the first token
            # The same two engines in process, the KV copied across: the same text. (Not a fixed text: which
            # token bf16's greedy prefill picks depends on the CPU's bf16 kernels, AMX or not.)
            prefill = make_engine(role="prefill", dtype="bfloat16", weights="native")
            decode = make_engine(role="decode", weights="fp16")
            ids = prefill.tokenizer.encode(prefill.tokenizer.apply_chat_template(messages))
            prefill.add_request("r", ids, SamplingParams(max_tokens=20, temperature=0))
            expected = "".join(out.text for out in prefill.step())
            move_kv(prefill, decode, "r")
            while decode.has_unfinished():
                expected += "".join(out.text for out in decode.step())
            assert reply.choices[0].message.content == expected
        finally:
            stack.stop()


@pytest.mark.parametrize("prefill_tp, decode_tp", [(2, 1), (1, 2), (2, 2)])
def test_tensor_parallel_workers_answer_as_one_process_does(redis_server: RedisServer, prefill_tp: int,
                                                            decode_tp: int) -> None:
    """TP2 prefill -> TP1 decode, the reverse, and TP2 -> TP2 (gloo ranks; each rank's KV heads over its own
    transport): the same greedy text as one engine in this process."""
    engine = {"kv_cache_memory_gib": KV_GIB, **PRECISION}
    with NatsServer() as nats:
        stack = start_stack(nats, redis_server, prefill={**engine, "tp": prefill_tp},
                            decode={**engine, "tp": decode_tp})
        try:
            info = httpx.get(f"{stack.url}/metrics").text
            for role, tp in (("prefill", prefill_tp), ("decode", decode_tp)):
                assert re.search(f'distserve_worker_info{{[^}}]*role="{role}"[^}}]*tp="{tp}"', info), role
            prompts = [PROMPT, "def fibonacci(n):"]
            for prompt, expected in zip(prompts, greedy_in_process(prompts, 16), strict=True):
                got = client(stack).completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                       extra_body={"ignore_eos": True})
                assert got.choices[0].text == expected
        finally:
            stack.stop()


@pytest.mark.skipif(len(available_cpus()) < 2, reason="pinning two workers needs two CPUs")
def test_pinned_stack_keeps_every_process_on_its_cpus() -> None:
    """`up --pin-workers --service-cpus`: each worker alone on its CPU, the gateway and servers elsewhere."""
    first, last = available_cpus()[0], available_cpus()[-1]
    engine = {"kv_cache_memory_gib": KV_GIB, "num_threads": 1, **PRECISION}
    stack = Stack(load_settings({"gateway": {"port": free_port()}, "prefill": engine, "decode": engine,
                                 "pin_workers": True, "service_cpus": [last]}), "WARNING", announce=False)
    try:
        stack.start()  # its own nats-server and redis-server, pinned too
        stack.wait_ready(300)
        reply = client(stack).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0)
        assert "Paris" in (reply.choices[0].message.content or "")
        expected = {"prefill-0": first, "decode-0": available_cpus()[1], "gateway": last}
        pids = {c.name: c.proc.pid for c in stack.children} | {s.name: s.pid for s in stack.servers}
        assert set(pids) == {*expected, "nats-server", "redis-server"}
        for name, pid in pids.items():
            for tid in os.listdir(f"/proc/{pid}/task"):  # threads started after the pinning too
                assert os.sched_getaffinity(int(tid)) == {expected.get(name, last)}, name
    finally:
        stack.stop()


def test_pinning_more_threads_than_cpus_fails_before_anything_starts() -> None:
    engine = {"num_threads": len(available_cpus())}
    stack = Stack(load_settings({"prefill": engine, "decode": engine, "pin_workers": True}), "WARNING",
                  announce=False)
    with pytest.raises(RuntimeError, match="needs as many CPUs"):
        stack.start()
    assert not stack.servers and not stack.children
    stack.stop()


def test_no_workers_is_503(redis_server: RedisServer) -> None:
    with NatsServer() as nats:
        stack = start_stack_without_workers(nats, redis_server)
        try:
            response = httpx.post(f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": "hi"})
            assert response.status_code == 503 and response.json()["error"]["code"] == "no_workers"
            assert response.headers["retry-after"] == "1"
            assert httpx.get(f"{stack.url}/health").status_code == 503
        finally:
            stack.stop()


def start_stack_without_workers(nats: NatsServer, redis: RedisServer) -> Stack:
    settings = load_settings({"nats_url": nats.url, "redis_url": redis.url, "prefill_instances": 0,
                              "decode_instances": 0, "gateway": {"port": free_port()}})
    stack = Stack(settings, "WARNING", announce=False)
    stack.start()
    assert wait_until(lambda: _answers(stack.url), 60)
    return stack


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
        return True
    except httpx.HTTPError:
        return False

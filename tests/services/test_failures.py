"""Failures mid-request: a KV pull that fails follows the policy; the last worker of a phase dies and
its requests end in time with a clear error, leaking no KV (with a spare worker they migrate:
test_migration.py). Each stack here has its own control plane (NATS) so its failures stay its own."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.servers import NatsServer, RedisServer
from tests.services.conftest import start_stack
from tests.services.test_stack import MODEL, PROMPT, metric, wait_until

# A pull can never finish this fast: every KV transfer fails, deterministically.
FAILING_PULLS = {"pull_timeout_s": 1e-6}


def test_failed_pull_recomputes_to_the_same_answer(redis_server: RedisServer) -> None:
    engine = LLMEngine(EngineConfig(kv_cache_memory_gib=0.05, weights="fp16"))
    engine.add_request("r", engine.tokenizer.encode(PROMPT), SamplingParams(max_tokens=12, temperature=0))
    expected = ""
    while engine.has_unfinished():
        expected += "".join(o.text for o in engine.step())
    with NatsServer() as nats:
        stack = start_stack(nats, redis_server, worker={**FAILING_PULLS, "kv_failure_policy": "recompute"})
        try:
            api = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=120)
            reply = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
            assert reply.choices[0].text == expected
            assert wait_until(lambda: metric(stack, "distserve_worker_kv_usage_ratio", instance="prefill-0",
                                             role="prefill") == 0.0)
        finally:
            stack.stop()


def test_failed_pull_with_fail_policy_is_a_clear_error(redis_server: RedisServer) -> None:
    with NatsServer() as nats:
        stack = start_stack(nats, redis_server, worker={**FAILING_PULLS, "kv_failure_policy": "fail"})
        try:
            response = httpx.post(f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                                      "max_tokens": 8}, timeout=60)
            assert response.status_code == 502
            assert "KV transfer failed" in response.json()["error"]["message"]
            assert wait_until(lambda: metric(stack, "distserve_worker_kv_usage_ratio", instance="prefill-0",
                                             role="prefill") == 0.0)
        finally:
            stack.stop()


def test_last_decode_worker_killed_ends_its_requests_in_time_and_frees_prefill_kv(
        redis_server: RedisServer) -> None:
    """No decode worker is left to migrate to: within dead_after_s + migration_wait_s, a clear 503."""
    with NatsServer() as nats:
        stack = start_stack(nats, redis_server, worker={"dead_after_s": 1.5})
        decode = next(c for c in stack.children if c.name == "decode-0")
        try:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
            started = 0.0
            with httpx.stream("POST", f"{stack.url}/v1/completions", json=body, timeout=60) as response:
                lines = response.iter_lines()
                for line in lines:
                    if line.startswith("data: {") and not started:  # decoding: kill the decode worker
                        os.kill(decode.proc.pid, signal.SIGKILL)
                        started = time.monotonic()
                    if '"error"' in line:
                        break
                else:
                    pytest.fail("the stream ended without an error event")
            assert "no live decode worker took the request" in line and time.monotonic() - started < 5
            assert wait_until(lambda: metric(stack, "distserve_worker_kv_usage_ratio", instance="prefill-0",
                                             role="prefill") == 0.0)
            assert httpx.get(f"{stack.url}/health").status_code == 503  # no decode worker left
        finally:
            decode.proc.wait()
            stack.stop()


def test_worker_shutdown_past_its_deadline_dumps_its_stacks_and_exits(
        redis_server: RedisServer, capfd: pytest.CaptureFixture[str]) -> None:
    """A worker's shutdown is bounded: past `shutdown_timeout_s` (here shorter than any real shutdown) it
    prints every thread's stack, so a CI log shows what hung, and exits with 1 instead of hanging."""
    with NatsServer() as nats:
        stack = start_stack(nats, redis_server, mode="colocated", worker={"shutdown_timeout_s": 0.001})
        worker = next(c for c in stack.children if c.name == "colocated-0")
        try:
            os.kill(worker.proc.pid, signal.SIGTERM)
            assert worker.proc.wait(15) == 1
            stderr = capfd.readouterr().err
            assert "Timeout (0:00:00" in stderr and "(most recent call first)" in stderr  # every thread's stack
        finally:
            stack.stop()

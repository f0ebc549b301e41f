"""Overload: 500 concurrent streaming clients against the default stack. Each gets its whole answer or a
429/503 that says when to retry (Retry-After), within a bounded time; nothing hangs, no other 5xx, and
once idle no KV is left in use and no request is pending."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx

from services.launcher import Stack
from tests.services.test_stack import MODEL, kv_in_use, metric, wait_until

CLIENTS = 500
MAX_TOKENS = 8


async def test_500_concurrent_streams_get_an_answer_or_a_retry_after(stack: Stack) -> None:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    outcomes: Counter[str] = Counter()

    async def one(http: httpx.AsyncClient, i: int) -> None:
        body = {"model": MODEL, "prompt": f"Request {i}: count to ten", "max_tokens": MAX_TOKENS, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", f"{stack.url}/v1/completions", json=body) as response:
            if response.status_code in (429, 503):
                assert int(response.headers["retry-after"]) >= 1
                assert "message" in json.loads(await response.aread())["error"]
                outcomes[str(response.status_code)] += 1
                return
            assert response.status_code == 200, response.status_code
            usage = [json.loads(line[6:])["usage"] async for line in response.aiter_lines()
                     if line.startswith("data: {") and '"usage":{' in line]
            assert usage and usage[-1]["completion_tokens"] == MAX_TOKENS
            outcomes["200"] += 1

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120, connect=30)) as http:
        await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(CLIENTS))), 240)
    assert sum(outcomes.values()) == CLIENTS and outcomes["200"] > 0, outcomes
    assert await asyncio.to_thread(wait_until, lambda: kv_in_use(stack.url) == 0.0)
    assert metric(stack, "distserve_gateway_pending_requests") == 0
    assert metric(stack, "distserve_gateway_inflight_requests") == 0

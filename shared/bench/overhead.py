"""`distserve bench overhead`: what the services add on top of the engine, per request and per token.

Starts a stack (gateway + 1 prefill + 1 decode worker, its own NATS and Redis) and sends requests
one at a time over streaming HTTP. For each request the workers record in Redis how long the
engine itself computed for it: its prefill step, and the decode steps that produced its tokens.
The baseline is that engine time, measured in the same run on the same requests:
  TTFT overhead      = client TTFT - prefill step time   (queueing, NATS, tokenization, HTTP)
  per-token overhead = (client decode time - decode step time) / (output tokens - 1)
                       (the KV transfer, NATS hops and SSE, spread over the decoded tokens)

The client is the standard library's http.client on one keep-alive connection, run in a thread:
it writes a request in one send and reads the event stream line by line. httpx's async client
costs about 2 ms per request on this 2-core machine (most of it before the request's first byte
leaves), which would be counted as service overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import random
import statistics
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from shared.config import load_settings
from shared.engine.tokenizer import load_tokenizer
from shared.servers import free_port
from shared.state import read_request


@dataclass
class Sample:
    ttft_s: float
    prefill_s: float
    decode_s: float  # client side: first token to last
    decode_compute_s: float
    output_tokens: int

    @property
    def ttft_overhead(self) -> float:
        return self.ttft_s - self.prefill_s

    @property
    def token_overhead(self) -> float:
        return (self.decode_s - self.decode_compute_s) / (self.output_tokens - 1)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("overhead", help="service overhead over the engine's own time: TTFT and per token")
    p.add_argument("--model", default="default")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 512])
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=20, help="requests per prompt length")
    p.set_defaults(func=run)


def one_request(conn: http.client.HTTPConnection, body: dict[str, object]) -> tuple[str, float, float, float]:
    """(request id, sent, first token, end) in perf_counter seconds."""
    payload = json.dumps(body).encode()
    sent = time.perf_counter()
    first = 0.0
    conn.request("POST", "/v1/completions", body=payload, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    while line := response.readline():
        if line.startswith(b"data: {") and not first and json.loads(line[6:])["choices"]:
            first = time.perf_counter()
    return response.headers["x-request-id"], sent, first, time.perf_counter()


async def measure(url: str, redis_url: str, model: str, prompts: list[str], output_tokens: int) -> list[Sample]:
    samples = []
    redis = aioredis.from_url(redis_url)
    address = urlsplit(url)
    conn = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=600)
    try:
        for prompt in prompts:
            body = {"model": model, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            rid, sent, first, end = await asyncio.to_thread(one_request, conn, body)
            state: dict[str, str] = {}
            for _ in range(100):  # the workers' state writes are batched: wait for the last one
                state = await read_request(redis, rid) or {}
                if "decode_compute_s" in state and "prefill_end" in state:
                    break
                await asyncio.sleep(0.02)
            samples.append(Sample(first - sent, float(state["prefill_end"]) - float(state["prefill_start"]),
                                  end - first, float(state["decode_compute_s"]), output_tokens))
    finally:
        conn.close()
        await redis.aclose()
    return samples


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def random_prompt(tokenizer_vocab: int, length: int, rng: random.Random) -> list[int]:
    return [rng.randrange(100, tokenizer_vocab) for _ in range(length)]


def run(args: argparse.Namespace) -> int:
    from services.launcher import Stack  # the bench starts a real stack

    if args.output_tokens < 2 or args.repeat < 1 or min(args.prompt_tokens) < 1:
        print("distserve bench overhead: needs --output-tokens >= 2, --repeat >= 1, prompt lengths >= 1")
        return 2
    tokenizer = load_tokenizer("default" if args.model.startswith("random:") else args.model)
    rng = random.Random(0)
    # +1: the first request of each length warms up. Text round trips keep the lengths close to asked.
    cases = {n: [tokenizer.decode(random_prompt(tokenizer.vocab_size, n, rng)) for _ in range(args.repeat + 1)]
             for n in args.prompt_tokens}
    settings = load_settings({"model": args.model, "gateway": {"port": free_port()},
                              "prefill": {"kv_cache_memory_gib": 0.25}, "decode": {"kv_cache_memory_gib": 0.25}})
    stack = Stack(settings, "WARNING", announce=False)
    try:
        stack.start()
        stack.wait_ready(600)
        model = httpx.get(f"{stack.url}/v1/models").json()["data"][0]["id"]
        assert stack.settings.redis_url is not None
        results = {n: asyncio.run(measure(stack.url, stack.settings.redis_url, model, prompts,
                                          args.output_tokens))[1:] for n, prompts in cases.items()}
    finally:
        stack.stop()

    table = Table(title=f"service overhead over engine time ({args.repeat} sequential requests per row, "
                        f"{args.output_tokens} output tokens)")
    for column in ("prompt tokens", "TTFT ms p50", "prefill step ms p50", "TTFT overhead ms p50 / p99",
                   "TPOT ms p50", "decode step ms p50", "per-token overhead ms p50 / p99"):
        table.add_column(column, justify="right")
    for n, got in results.items():
        tpot = [s.decode_s / (s.output_tokens - 1) for s in got]
        step = [s.decode_compute_s / (s.output_tokens - 1) for s in got]
        ttft_over = [s.ttft_overhead for s in got]
        token_over = [s.token_overhead for s in got]
        table.add_row(str(n), f"{statistics.median(s.ttft_s for s in got) * 1e3:.1f}",
                      f"{statistics.median(s.prefill_s for s in got) * 1e3:.1f}",
                      f"{pct(ttft_over, 0.5) * 1e3:.2f} / {pct(ttft_over, 0.99) * 1e3:.2f}",
                      f"{statistics.median(tpot) * 1e3:.2f}", f"{statistics.median(step) * 1e3:.2f}",
                      f"{pct(token_over, 0.5) * 1e3:.3f} / {pct(token_over, 0.99) * 1e3:.3f}")
    Console(width=150).print(table)
    return 0

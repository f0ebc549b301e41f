"""`distserve bench overhead`: what the services add on top of the engine, per request and per token.

Starts a stack (gateway + 1 prefill + 1 decode worker, its own NATS and Redis) and sends requests
one at a time over streaming HTTP. For each request the workers record in Redis how long the
engine itself computed for it: its prefill step, and the decode steps that produced its tokens.
The baseline is that engine time, measured in the same run on the same requests:
  TTFT overhead      = client TTFT - prefill step time   (queueing, NATS, tokenization, HTTP)
  per-token overhead = (client decode time - decode step time) / (output tokens - 1)
                       (the KV transfer, NATS hops and SSE, spread over the decoded tokens)
A second table splits the TTFT overhead hop by hop (HOPS), from the same request's Redis timeline
and the client's stamps (one wall clock: every process runs on this machine). A third table times
the gateway's tokenizer on fresh prompts of the same lengths, back to back and after an idle gap.

The client is kept thin, since its own time counts as overhead: one keep-alive connection, each
request written in one send, the response parsed by httptools (uvicorn's C parser, chunked encoding
included) and the event stream scanned as it arrives; the first token is stamped when the first
event with a choice has been read and parsed. It runs in a thread (blocking socket). On this 2-core
machine, against a server that answers at once, it reaches the first event about 0.5 ms sooner than
the standard library's http.client (whose header parsing is pure Python) and about 2 ms sooner than
httpx's async client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import httptools
import httpx
from rich.console import Console
from rich.table import Table

from services.launcher import Stack
from shared.config import load_settings
from shared.model_files import tokenizer_source
from shared.servers import free_port
from shared.state import Phase, connect_redis, read_request
from shared.tokenizer import Tokenizer, load_tokenizer

# The TTFT overhead hop by hop: (label, from, to): phases of the request's state, and the client's own
# "sent" (request written) and "first" (first token read).
HOPS: tuple[tuple[str, Phase | Literal["sent"], Phase | Literal["first"]], ...] = (
    ("client -> gateway accepted (HTTP, validation, tokenizing)", "sent", "arrived"),
    ("-> prefill worker queued it (NATS)", "arrived", "queued"),
    ("-> engine step starts", "queued", "prefill_start"),
    ("step ends -> gateway has the first token (KV export, NATS)", "prefill_end", "first_token"),
    ("-> client has it (SSE)", "first_token", "first"),
)


@dataclass
class Sample:
    ttft_s: float
    prefill_s: float
    decode_s: float  # client side: first token to last
    decode_compute_s: float
    output_tokens: int
    phases: tuple[float, ...]  # seconds in each of HOPS

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


class _Response:
    """httptools callbacks for one response: its headers, and its body as it arrives."""

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def one_request(sock: socket.socket, body: dict[str, object]) -> tuple[str, float, float, float, float]:
    """(request id, sent, first token, end, wall clock - perf_counter), in seconds, on a keep-alive connection."""
    payload = json.dumps(body).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(payload)) + payload
    response = _Response()
    parser = httptools.HttpResponseParser(response)
    scanned = 0  # the body up to here is scanned for the first event
    wall = time.time() - time.perf_counter()
    sent = time.perf_counter()
    first = 0.0
    sock.sendall(request)
    while not response.complete:
        data = sock.recv(1 << 16)
        if not data:
            raise RuntimeError("the gateway closed the connection mid-response")
        parser.feed_data(data)
        while not first and (end := response.body.find(b"\n", scanned)) >= 0:
            line = bytes(response.body[scanned:end])
            scanned = end + 1
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"]:
                first = time.perf_counter()
    if parser.get_status_code() != 200:
        raise RuntimeError(f"HTTP {parser.get_status_code()}: {bytes(response.body[:200])!r}")
    return response.headers[b"x-request-id"].decode(), sent, first, time.perf_counter(), wall


async def measure(url: str, redis_url: str, model: str, prompts: list[str], output_tokens: int) -> list[Sample]:
    samples = []
    redis = connect_redis(redis_url)
    address = urlsplit(url)
    sock = socket.create_connection((address.hostname or "127.0.0.1", address.port or 80), timeout=600)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for prompt in prompts:
            body = {"model": model, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            rid, sent, first, end, wall = await asyncio.to_thread(one_request, sock, body)
            state: dict[str, str] = {}
            for _ in range(100):  # the workers' state writes are batched: wait for the last one
                state = await read_request(redis, rid) or {}
                if "decode_compute_s" in state and "prefill_end" in state:
                    break
                await asyncio.sleep(0.02)
            times = {"sent": sent + wall, "first": first + wall,
                     **{field: float(state[field]) for _, a, b in HOPS for field in (a, b) if field in state}}
            samples.append(Sample(first - sent, float(state["prefill_end"]) - float(state["prefill_start"]),
                                  end - first, float(state["decode_compute_s"]), output_tokens,
                                  tuple(times[b] - times[a] for _, a, b in HOPS)))
    finally:
        sock.close()
        await redis.aclose()
    return samples


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def random_prompt(tokenizer_vocab: int, length: int, rng: random.Random) -> list[int]:
    return [rng.randrange(100, tokenizer_vocab) for _ in range(length)]


def run(args: argparse.Namespace) -> int:
    if args.output_tokens < 2 or args.repeat < 1 or min(args.prompt_tokens) < 1:
        print("distserve bench overhead: needs --output-tokens >= 2, --repeat >= 1, prompt lengths >= 1")
        return 2
    tokenizer = load_tokenizer(tokenizer_source(args.model))
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
    console = Console(width=150)
    console.print(table)
    phases = Table(title="where the TTFT overhead goes, hop by hop (ms p50; the p50s need not add up to the total's)")
    phases.add_column("prompt tokens", justify="right")
    for label, _, _ in HOPS:
        phases.add_column(label, justify="right")
    for n, got in results.items():
        phases.add_row(str(n), *(f"{statistics.median(s.phases[i] for s in got) * 1e3:.2f}"
                                 for i in range(len(HOPS))))
    console.print(phases)
    console.print(tokenizing_table(tokenizer, args.prompt_tokens, args.repeat))
    return 0


def tokenizing_table(tokenizer: Tokenizer, lengths: list[int], repeat: int) -> Table:
    """What the gateway's tokenizing costs, back to back and after an idle gap (as a request meets it).

    Fresh prompts each time (the BPE cache is cold for them, as for a new request's words)."""
    rng = random.Random(1)
    table = Table(title="tokenizing one prompt (ms p50), fresh prompts, in this process")
    for column in ("prompt tokens", "back to back", "after 10 ms idle"):
        table.add_column(column, justify="right")
    for n in lengths:
        row = [str(n)]
        for gap in (0.0, 0.01):
            times = []
            for _ in range(repeat):
                prompt = tokenizer.decode(random_prompt(tokenizer.vocab_size, n, rng))
                if gap:
                    time.sleep(gap)  # the core idles: its caches and clock are what a request finds
                start = time.perf_counter()
                tokenizer.encode(prompt)
                times.append(time.perf_counter() - start)
            row.append(f"{statistics.median(times) * 1e3:.2f}")
        table.add_row(*row)
    return table

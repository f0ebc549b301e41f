"""`distserve bench chaos`: a seeded load through a supervised stack while, in turn, each fault strikes.

The stack is what `distserve up` runs (two prefill and two decode workers, so that a request has
somewhere to migrate; its own nats-server and redis-server; the supervisor restarting what dies). A
baseline run without faults gives every request's undisturbed text and latency; then, for each fault,
the same requests arrive at the same times (greedy decoding) and the fault strikes once a third of them
are sent. Per fault it prints: sent, completed with the undisturbed text, completed with another text
(must be 0), migrated (from each request's state in Redis), ended with a clear error (an HTTP status or
an error event with a message), lost (no answer within the bound: must be 0), and the added latency of
the migrated requests over their undisturbed run (p50, p99).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from rich.console import Console
from rich.table import Table

from services.bench.client import chunk_text, discover_model
from services.bench.metrics import percentile
from services.launcher import Stack
from shared.argtypes import names_from, positive_int
from shared.config import load_settings
from shared.engine.precision import cpu_kind, cpu_model
from shared.servers import free_port
from shared.state import connect_redis, read_request

FAULTS: dict[str, str] = {
    "decode-kill": "SIGKILL of decode-0 mid-stream (restarted by the supervisor)",
    "prefill-kill": "SIGKILL of prefill-0 with prompts queued (restarted by the supervisor)",
    "nats-restart": "SIGKILL of the nats-server (restarted on its port by the supervisor)",
    "redis-restart": "SIGKILL of the redis-server (restarted on its port by the supervisor)",
}
TOPICS = ("a lighthouse", "the moon", "a robot", "a river", "an old clock", "a dragon", "the sea", "a library")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chaos", help="a seeded load while workers, NATS and Redis are killed in turn")
    p.add_argument("--requests", type=positive_int, default=40, help="requests per run")
    p.add_argument("--rate", type=float, default=4.0, help="arrivals per second (Poisson)")
    p.add_argument("--max-tokens", type=positive_int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", type=names_from(FAULTS, "fault"), default=tuple(FAULTS), help=", ".join(FAULTS))
    p.add_argument("--bound-s", type=float, default=120.0, help="a request with no answer by then is lost")
    p.add_argument("--model", default="default")
    p.set_defaults(func=run)


@dataclass
class Outcome:
    text: str = ""
    error: str | None = None
    latency: float = 0.0
    request_id: str = ""
    answered: bool = False  # completed or ended with a clear error, within the bound


@dataclass(frozen=True)
class Load:
    prompts: list[str]
    offsets: list[float]  # seconds after the start of the run
    max_tokens: int
    bound_s: float


def seeded_load(requests: int, rate: float, max_tokens: int, seed: int, bound_s: float) -> Load:
    rng = random.Random(seed)
    prompts = [f"Request {i}: write a short story about {rng.choice(TOPICS)}." for i in range(requests)]
    offsets, t = [], 0.0
    for _ in range(requests):
        offsets.append(t)
        t += rng.expovariate(rate)
    return Load(prompts, offsets, max_tokens, bound_s)


async def one(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> Outcome:
    outcome, sent = Outcome(), time.perf_counter()
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            outcome.request_id = response.headers.get("x-request-id", "")
            if response.status_code != 200:
                message = json.loads(await response.aread()).get("error", {}).get("message")
                outcome.error, outcome.answered = f"HTTP {response.status_code}: {message}", bool(message)
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        message = chunk["error"].get("message")
                        outcome.error, outcome.answered = f"error event: {message}", bool(message)
                        break
                    outcome.text += chunk_text(chunk)
                else:
                    outcome.answered = True
    except (httpx.HTTPError, ValueError) as exc:  # no answer that says what happened: lost
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.latency = time.perf_counter() - sent
    return outcome


async def run_load(url: str, model: str, load: Load, fault: Callable[[], None] | None) -> list[Outcome]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(load.bound_s, connect=10)) as http:
        start = time.perf_counter()

        async def at(i: int) -> Outcome:
            await asyncio.sleep(max(0.0, start + load.offsets[i] - time.perf_counter()))
            try:
                return await asyncio.wait_for(one(http, url, model, load.prompts[i], load.max_tokens), load.bound_s)
            except TimeoutError:
                return Outcome(error="no answer within the bound")

        async def strike() -> None:
            await asyncio.sleep(max(0.0, start + load.offsets[len(load.offsets) // 3] - time.perf_counter()) + 0.5)
            if fault is not None:
                fault()

        outcomes, _ = await asyncio.gather(asyncio.gather(*(at(i) for i in range(len(load.prompts)))), strike())
        return list(outcomes)


async def migrations(redis_url: str, outcomes: list[Outcome]) -> list[int]:
    client = connect_redis(redis_url)
    try:
        counts = []
        for outcome in outcomes:
            state = await read_request(client, outcome.request_id) if outcome.request_id else None
            counts.append(int((state or {}).get("migrations", 0)))
        return counts
    finally:
        await client.aclose()


def fault_action(stack: Stack, name: str) -> Callable[[], None]:
    def kill(pid: int | None) -> None:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)

    child = {c.name: c for c in stack.children}
    server = {s.name: s for s in stack.servers}
    return {
        "decode-kill": lambda: kill(child["decode-0"].proc.pid),
        "prefill-kill": lambda: kill(child["prefill-0"].proc.pid),
        "nats-restart": lambda: kill(server["nats-server"].pid),
        "redis-restart": lambda: kill(server["redis-server"].pid),
    }[name]


def wait_whole(stack: Stack, timeout: float = 300.0) -> None:
    """Until every worker is back and registered (after a fault the supervisor repaired)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{stack.url}/health", timeout=2).json()
            if health["workers"]["prefill"] == 2 and health["workers"]["decode"] == 2:
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise RuntimeError("the stack did not come back whole after the fault")


def run(args: argparse.Namespace) -> int:
    console = Console(width=150)
    settings = load_settings({"model": args.model, "prefill_instances": 2, "decode_instances": 2,
                              "gateway": {"port": free_port()}, "worker": {"dead_after_s": 1.5},
                              "restart": "on-failure", "restart_limit": 10})
    stack = Stack(settings, "ERROR", announce=False)
    watcher = threading.Thread(target=stack.watch, daemon=True)
    load = seeded_load(args.requests, args.rate, args.max_tokens, args.seed, args.bound_s)
    table = Table(title=f"bench chaos: {args.requests} requests at {args.rate:g}/s, {args.max_tokens} tokens "
                        f"each, greedy; 2 prefill + 2 decode workers; {cpu_model()} ({cpu_kind()}), "
                        f"{os.cpu_count()} CPUs")
    for column in ("fault", "sent", "completed", "other text", "migrated", "clear error", "lost",
                   "added latency p50 / p99 (s)"):
        table.add_column(column, justify="left" if column == "fault" else "right")
    try:
        stack.start()
        stack.wait_ready(600)
        watcher.start()
        model = asyncio.run(discover_model(stack.url))
        baseline = asyncio.run(run_load(stack.url, model, load, None))
        failed = [o.error for o in baseline if o.error]
        if failed:
            console.print(f"[red]the baseline run failed: {failed[:3]}")
            return 1
        table.add_row("none (baseline)", str(len(baseline)), str(len(baseline)), "0", "0", "0", "0", "")
        for name in args.faults:
            outcomes = asyncio.run(run_load(stack.url, model, load, fault_action(stack, name)))
            wait_whole(stack)
            moved = asyncio.run(migrations(stack.settings.redis_url or "", outcomes))
            completed = [o for o in outcomes if o.error is None]
            same = sum(1 for o, b in zip(outcomes, baseline, strict=True) if o.error is None and o.text == b.text)
            errors = [o for o in outcomes if o.error is not None and o.answered]
            lost = sum(1 for o in outcomes if not o.answered)
            added = [o.latency - b.latency for o, b, m in zip(outcomes, baseline, moved, strict=True)
                     if m and o.error is None]
            p50, p99 = percentile(added, 50), percentile(added, 99)
            latency = f"{p50:.2f} / {p99:.2f}" if p50 is not None and p99 is not None else ""
            table.add_row(name, str(len(outcomes)), str(same), str(len(completed) - same),
                          str(sum(1 for m in moved if m)), str(len(errors)), str(lost), latency)
            for error in sorted({o.error or "" for o in outcomes if o.error})[:3]:
                console.print(f"  {name}: {error[:160]}")
        console.print(table)
        for name in args.faults:
            console.print(f"  {name}: {FAULTS[name]}")
        median = statistics.median(o.latency for o in baseline)
        console.print(f"  baseline median latency {median:.2f} s")
        return 0
    finally:
        stack.stopping = True
        watcher.join(timeout=10)
        stack.stop()

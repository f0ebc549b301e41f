"""`distserve up` supervises its children: a killed worker or server is restarted and serving resumes; past the
restart limit, or with `restart: never`, the stack stops. Each stack here runs its own nats-server and
redis-server (the launcher's), and its faults are kill -9 by PID."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai

from services.launcher import Stack, backoff_s
from shared.config import load_settings
from shared.servers import free_port
from tests.services.conftest import KV_GIB, PRECISION, request_states
from tests.services.test_stack import MODEL, PROMPT, client, wait_until

ENGINE = {"kv_cache_memory_gib": KV_GIB, **PRECISION}


@contextmanager
def watched_stack(**settings: Any) -> Iterator[tuple[Stack, list[int]]]:
    """A started stack whose `watch()` (the supervisor) runs in a thread; its exit code lands in the list."""
    stack = Stack(load_settings({"gateway": {"port": free_port()}, "prefill": ENGINE, "decode": ENGINE,
                                 "worker": {"dead_after_s": 1.5}, **settings}), "WARNING", announce=False)
    exits: list[int] = []
    thread = threading.Thread(target=lambda: exits.append(stack.watch()), daemon=True)
    try:
        stack.start()
        stack.wait_ready(300)
        thread.start()
        yield stack, exits
    finally:
        stack.stopping = True
        thread.join(timeout=10)
        stack.stop()


def answers(stack: Stack) -> bool:
    try:
        reply = client(stack).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                                 timeout=20)
    except openai.APIError:
        return False
    return reply.usage is not None and reply.usage.completion_tokens == 4


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff_s(n) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_s(20) == 30.0


def test_killed_worker_and_redis_are_restarted_and_the_limit_stops_the_stack() -> None:
    with watched_stack(restart_limit=1) as (stack, exits):
        decode = next(c for c in stack.children if c.name == "decode-0")
        first_pid = decode.proc.pid
        os.kill(first_pid, signal.SIGKILL)
        assert wait_until(lambda: decode.proc.pid != first_pid, 30), "decode-0 was not restarted"
        assert wait_until(lambda: answers(stack), 120), "the restarted decode worker does not serve"

        redis_server = next(s for s in stack.servers if s.name == "redis-server")
        port, redis_pid = redis_server.port, redis_server.pid
        assert redis_pid is not None
        os.kill(redis_pid, signal.SIGKILL)
        assert answers(stack)  # nothing on the token path waits for Redis
        assert wait_until(lambda: redis_server.alive() and redis_server.pid != redis_pid, 30)
        assert redis_server.port == port  # the children keep their URL, password included
        assert redis_server.password and stack.settings.redis_url == redis_server.url
        request_id = client(stack).completions.with_raw_response.create(
            model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0).headers["x-request-id"]

        def status() -> str:
            states = asyncio.run(request_states(redis_server.url, request_id))
            return states[0].get("status", "") if states else ""

        assert wait_until(lambda: status() == "finished", 20)

        os.kill(decode.proc.pid, signal.SIGKILL)  # a second death within a minute of its restart: past the limit
        assert wait_until(lambda: exits == [1], 20)


def test_restart_never_stops_the_stack_at_the_first_death() -> None:
    with watched_stack(restart="never") as (stack, exits):
        prefill = next(c for c in stack.children if c.name == "prefill-0")
        os.kill(prefill.proc.pid, signal.SIGKILL)
        assert wait_until(lambda: exits == [1], 10)
        assert prefill.state.due is None  # nothing scheduled

"""A real OpenAI-style streaming server on 127.0.0.1 with fixed, known delays, for load generator tests.

Each request: wait for the single "prefill" slot if ``serial_prefill`` (FIFO, so queueing delay is
exact), hold it ``prefill_s``, stream the first token, then one token every ``token_gap_s``.
Prompts containing FAIL get HTTP 500; prompts containing BREAK get an error event mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class StubState:
    prefill_s: float = 0.3
    token_gap_s: float = 0.1
    serial_prefill: bool = False
    send_usage: bool = True
    bodies: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # perf_counter at request arrival
    in_flight: int = 0
    max_in_flight: int = 0


def build_app(state: StubState) -> FastAPI:
    app = FastAPI()
    prefill_slot = asyncio.Lock()  # FIFO: waiters acquire in arrival order

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    async def serve(request: Request, chat: bool) -> Any:
        body = await request.json()
        state.bodies.append(body)
        state.arrivals.append(time.perf_counter())
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if "FAIL" in prompt:
            return JSONResponse({"error": {"message": "stub failure"}}, status_code=500)
        events = stream(prompt, int(body["max_tokens"]), chat, body)
        return StreamingResponse(events, media_type="text/event-stream")

    async def stream(prompt: str, max_tokens: int, chat: bool, body: dict[str, Any]) -> AsyncIterator[str]:
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            if chat:  # OpenAI sends the role first, with empty content: not a token
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            if state.serial_prefill:
                async with prefill_slot:
                    await asyncio.sleep(state.prefill_s)
            else:
                await asyncio.sleep(state.prefill_s)
            for i in range(max_tokens):
                if i:
                    await asyncio.sleep(state.token_gap_s)
                if "BREAK" in prompt and i == 1:
                    yield _sse({"error": {"message": "stub broke mid-stream"}})
                    return
                text = f" t{i}"
                choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
                yield _sse({"choices": [choice]})
            if state.send_usage and body.get("stream_options", {}).get("include_usage"):
                usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": max_tokens}
                yield _sse({"choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            state.in_flight -= 1

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await serve(request, chat=True)

    return app


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class StubServer:
    """Runs the app with uvicorn in a thread on a free loopback port."""

    def __init__(self, state: StubState) -> None:
        self.state = state
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(build_app(state), log_level="warning", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> StubServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("stub server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

"""A server-sent event stream whose headers and first chunk go out at once.

Under ASGI spec < 2.4 (what uvicorn speaks), Starlette's StreamingResponse first opens a task group
that watches for the client's disconnect and only then starts streaming, from a new task a loop
iteration later. For an LLM stream the first chunk is the one TTFT waits for, and it is ready when
the response is built, so it is written before that set-up; the rest streams under Starlette's
disconnect watch as before (a client that leaves still closes the chunk iterator).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class EventStreamResponse(StreamingResponse):
    def __init__(self, chunks: AsyncIterator[str], headers: Mapping[str, str] | None = None) -> None:
        super().__init__(chunks, headers=headers, media_type="text/event-stream")
        self.chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            first = await anext(self.chunks, None)
            if first is not None:
                await send({"type": "http.response.body", "body": first.encode(), "more_body": True})
        except OSError as exc:  # ASGI >= 2.4 servers raise it for a client that is gone
            raise ClientDisconnect() from exc
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        """The chunks after the first (the headers are out already)."""
        async for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

"""A streaming client for OpenAI-compatible endpoints that times each request.

It speaks /v1/completions or /v1/chat/completions with ``stream: true`` and reads the SSE stream.
TTFT ends at the first chunk with non-empty text; the output length comes from the final ``usage``
(asked for with ``stream_options.include_usage``) or, from servers that send none, the number of
content chunks. ``ignore_eos`` (vLLM's and ours) makes outputs as long as asked; strict servers that
reject unknown fields need ``ignore_eos=False``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

Api = Literal["completions", "chat"]
APIS: tuple[Api, ...] = ("completions", "chat")


@dataclass(frozen=True)
class ClientConfig:
    base_url: str  # e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    model: str
    api: Api = "completions"
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged last: may override anything
    request_timeout_s: float = 600.0
    api_key: str | None = None

    @property
    def url(self) -> str:
        path = "/completions" if self.api == "completions" else "/chat/completions"
        return _v1_base(self.base_url) + path

    def body(self, prompt: str | list[int], max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.api == "completions":
            body["prompt"] = prompt
        elif isinstance(prompt, str):
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            raise ValueError("token-id prompts go to /v1/completions (--api completions)")
        if self.ignore_eos:
            body["ignore_eos"] = True
        return {**body, **self.extra_body}

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _v1_base(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


@dataclass
class Timing:
    """What one streamed request measured (perf_counter seconds)."""

    sent: float
    first_token: float | None = None
    end: float | None = None
    content_chunks: int = 0
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        usage = self.usage_completion_tokens
        return usage if usage is not None else self.content_chunks


def make_http_client(config: ClientConfig) -> httpx.AsyncClient:
    # No connection cap: an open-loop client must never queue requests on its own side.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(config.request_timeout_s, connect=10.0)
    return httpx.AsyncClient(limits=limits, timeout=timeout, headers=config.headers())


async def stream_request(http: httpx.AsyncClient, config: ClientConfig, prompt: str | list[int], max_tokens: int
                         ) -> Timing:
    """Send one streaming request and time it. Never raises for server or network failures."""
    timing = Timing(sent=time.perf_counter())
    try:
        async with http.stream("POST", config.url, json=config.body(prompt, max_tokens)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                timing.error = f"HTTP {response.status_code}: {body[:300]}"
                return timing
            async for line in response.aiter_lines():
                if _read_sse_line(line, timing, time.perf_counter()):
                    break
        if timing.error is None:
            timing.end = time.perf_counter()
            if timing.first_token is None:
                timing.error = "stream ended without any output text"
    except httpx.HTTPError as e:
        timing.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return timing


def _read_sse_line(line: str, timing: Timing, now: float) -> bool:
    """Fold one SSE line into ``timing``; True at the end of the stream."""
    if not line.startswith("data:"):
        return False  # blank separators, comments (": ping") and event names
    data = line[5:].strip()
    if data == "[DONE]":
        return True
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        timing.error = f"bad SSE data: {data[:200]}"
        return True
    if not isinstance(chunk, dict):
        timing.error = f"bad SSE data: {data[:200]}"
        return True
    if "error" in chunk:
        timing.error = f"server error: {json.dumps(chunk['error'])[:300]}"
        return True
    if chunk_text(chunk):
        timing.content_chunks += 1
        if timing.first_token is None:
            timing.first_token = now
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("completion_tokens"), int):
            timing.usage_completion_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            timing.usage_prompt_tokens = usage["prompt_tokens"]
    return False


def chunk_text(chunk: dict[str, Any]) -> str:
    """The new text in a completions or chat completions chunk ('' for usage-only chunks)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        text = delta.get("content") or delta.get("reasoning_content") or ""
    else:
        text = choice.get("text") or ""
    return text if isinstance(text, str) else ""


async def discover_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model id served at ``base_url`` (GET /v1/models). Raises ConnectionError if unreachable."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=timeout_s, headers=headers) as http:
            response = await http.get(_v1_base(base_url) + "/models")
    except httpx.HTTPError as e:
        raise ConnectionError(f"cannot reach {base_url}: {type(e).__name__}: {e}") from e
    if response.status_code != 200:
        raise ConnectionError(f"GET /v1/models at {base_url}: HTTP {response.status_code}; pass --model")
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ConnectionError(f"GET /v1/models at {base_url} listed no model; pass --model") from e

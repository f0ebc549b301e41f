"""Request state in Redis: one hash per request (status, phase timestamps, instances, token counts).

`RequestFields` is the schema of that hash: every service writes the fields of the phases it runs
through `StateWriter.update(request_id, **fields)`, which mypy checks against it, and the readers
(`distserve requests`, the benchmarks) name phases by `Phase`. Writes go through `StateWriter`, which
buffers them (bounded) and flushes in pipelined batches from a background task, a few milliseconds
after the first write of a batch: a Redis round trip never sits on the token path (nor does building
the pipeline, which would otherwise run in the very next loop iteration, ahead of the NATS publish
or the token send that the same event started), and a slow or absent Redis costs nothing on the token
path: writes that fail stay buffered (bounded) and are retried with backoff, so the state of requests
served during a Redis outage lands once it is back.

Timestamps are wall-clock seconds (time.time()); `distserve requests show ID` prints the timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Literal, TypedDict, get_args

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from typing_extensions import Unpack

from shared.tasks import cancel_all

log = logging.getLogger(__name__)

_TIMEOUT_S = 5.0
_RETRY_MAX_S = 5.0  # writes to an unreachable Redis are retried this often at most
KEY_PREFIX = "distserve:request:"
INDEX_KEY = "distserve:requests"  # sorted set: request id by arrival time
INDEX_MAX = 10_000

# The phases of a request in the order they happen; each is a timestamp field of RequestFields.
Phase = Literal["arrived", "queued", "prefill_start", "prefill_end", "first_token", "kv_transfer_start",
                "kv_transfer_end", "decode_start", "migrated", "finish"]
PHASES: tuple[Phase, ...] = get_args(Phase)
Status = Literal["queued", "prefilled", "decoding", "finished", "aborted", "failed"]
STATUSES: tuple[Status, ...] = get_args(Status)


class RequestFields(TypedDict, total=False):
    """Every field of a request's hash, with who writes it. Timestamps are wall-clock seconds."""

    # gateway
    status: Status
    model: str
    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    finish_reason: str
    error: str  # also a worker's, when it ends the request
    arrived: float  # the gateway accepted it
    first_token: float  # the gateway received the first token
    finish: float
    migrations: int  # times it moved to another worker because its own died
    migrated: float  # the last time it did
    migration: str  # the last migration: the phase, the new worker, why
    # prefill (or colocated) worker
    prefill_instance: str
    queued: float  # it joined the worker's queue
    prefill_start: float  # the step that computed its prompt's last token
    prefill_end: float
    # decode (or colocated) worker
    decode_instance: str
    kv_transfer_start: float
    kv_transfer_end: float
    kv_bytes: int
    kv_transfer_ms: float
    kv_transport: str
    kv_recomputed: int  # 1: the pull failed and the decode worker recomputed the prefill
    kv_error: str
    decode_start: float  # it joined a decode batch
    decode_compute_s: float  # time in the decode steps that produced its tokens


def connect_redis(url: str) -> aioredis.Redis:
    """A client that gives up on a stalled server (every service's, so none waits on Redis forever)."""
    return aioredis.from_url(url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S)


def request_key(request_id: str) -> str:
    return KEY_PREFIX + request_id


class StateWriter:
    """Fire-and-forget, batched writes of request fields; `update` never blocks."""

    def __init__(self, client: aioredis.Redis | None, ttl_s: int, max_buffer: int = 50_000,
                 max_batch: int = 512, window_s: float = 0.01) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.max_buffer = max_buffer
        self.max_batch = max_batch
        self.window_s = window_s  # writes within this long of a batch's first one are flushed with it
        self.pending: dict[str, dict[str, Any]] = {}  # merged per request until the next flush
        self.dropped = 0
        self.written = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def update(self, request_id: str, **fields: Unpack[RequestFields]) -> None:
        if self.client is None:
            return
        entry = self.pending.get(request_id)
        if entry is None:
            if len(self.pending) >= self.max_buffer:
                self.dropped += 1
                return
            entry = self.pending[request_id] = {}
        entry.update(fields)
        self._wake.set()

    def start(self) -> None:
        if self.client is not None and self._task is None:
            self._task = asyncio.create_task(self._run(), name="state-writer")

    async def close(self) -> None:
        """Flush what is buffered, then stop."""
        await cancel_all([self._task])
        self._task = None
        with contextlib.suppress(RedisError, OSError):
            while self.pending:
                await self._flush()

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.window_s)
            self._wake.clear()
            try:
                await self._flush()
            except (RedisError, OSError) as exc:
                failures += 1
                if failures == 1:
                    log.warning("request state not written to Redis (%s); buffering it and retrying", exc)
                await asyncio.sleep(min(0.25 * 2 ** (failures - 1), _RETRY_MAX_S))
            else:
                if failures:
                    log.warning("request state written to Redis again (%d requests' fields waiting)",
                                len(self.pending))
                failures = 0
            if self.pending:
                self._wake.set()

    async def _flush(self) -> None:
        assert self.client is not None
        ids = list(self.pending)[: self.max_batch]
        batch = {rid: self.pending.pop(rid) for rid in ids}
        pipe = self.client.pipeline(transaction=False)
        for rid, fields in batch.items():
            key = request_key(rid)
            pipe.hset(key, mapping={k: _encode(v) for k, v in fields.items()})
            pipe.expire(key, self.ttl_s)
            if "arrived" in fields:
                pipe.zadd(INDEX_KEY, {rid: float(fields["arrived"])})
        if any("arrived" in f for f in batch.values()):
            pipe.zremrangebyrank(INDEX_KEY, 0, -INDEX_MAX - 1)
        try:
            await pipe.execute()
        except (RedisError, OSError):
            self._requeue(batch)
            raise
        self.written += len(batch)

    def _requeue(self, batch: dict[str, dict[str, Any]]) -> None:
        """A failed batch goes back under the fields written since (newer values win), within the bound."""
        for rid, fields in batch.items():
            newer = self.pending.pop(rid, None)
            if len(self.pending) >= self.max_buffer:
                self.dropped += 1
                continue
            self.pending[rid] = fields | (newer or {})


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


async def read_request(client: aioredis.Redis, request_id: str) -> dict[str, str] | None:
    raw = await client.hgetall(request_key(request_id))
    if not raw:
        return None
    return {_text(k): _text(v) for k, v in raw.items()}


async def recent_requests(client: aioredis.Redis, count: int = 20) -> list[str]:
    ids = await client.zrevrange(INDEX_KEY, 0, count - 1)
    return [_text(r) for r in ids if isinstance(r, bytes | str)]


# Engine steps each worker served (shared.engine.StepRecord as JSON), one list per worker, newest last:
# what `distserve profile --refit` fits a latency profile to.
STEPS_KEY_PREFIX = "distserve:steps:"
STEPS_MAX = 20_000


def steps_key(role: str, instance_id: str) -> str:
    return f"{STEPS_KEY_PREFIX}{role}:{instance_id}"


async def push_steps(client: aioredis.Redis, key: str, records: list[str], ttl_s: int) -> None:
    async with client.pipeline(transaction=False) as pipe:
        pipe.rpush(key, *records)
        pipe.ltrim(key, -STEPS_MAX, -1)
        pipe.expire(key, ttl_s)
        await pipe.execute()


async def read_steps(client: aioredis.Redis) -> dict[str, list[dict[str, Any]]]:
    """Every worker's recorded steps, by '<role>:<instance id>'."""
    out: dict[str, list[dict[str, Any]]] = {}
    async for key in client.scan_iter(match=STEPS_KEY_PREFIX + "*"):
        name = _text(key)[len(STEPS_KEY_PREFIX):]
        out[name] = [json.loads(_text(r)) for r in await client.lrange(key, 0, -1)]
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def timeline(state: Mapping[str, str]) -> list[tuple[str, float, float]]:
    """(phase, ms since arrival, ms since the previous phase) for the phases that happened."""
    times = [(phase, float(state[phase])) for phase in PHASES if phase in state]
    if not times:
        return []
    origin = times[0][1]
    rows: list[tuple[str, float, float]] = []
    previous = origin
    for phase, t in sorted(times, key=lambda pt: pt[1]):
        rows.append((phase, (t - origin) * 1e3, (t - previous) * 1e3))
        previous = t
    return rows


def format_request(request_id: str, state: Mapping[str, str]) -> str:
    """A human-readable timeline of one request."""
    lines = [f"request {request_id}  status={state.get('status', '?')}"]
    for key in ("model", "prefill_instance", "decode_instance", "prompt_tokens", "output_tokens",
                "finish_reason", "kv_transport", "kv_bytes", "kv_transfer_ms", "kv_recomputed", "migrations",
                "migration", "error"):
        if key in state:
            lines.append(f"  {key:<17} {state[key]}")
    if "arrived" in state:
        arrived = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(state["arrived"])))
        lines.append(f"  {'arrived at':<17} {arrived}")
    lines.append(f"  {'phase':<18}{'t (ms)':>10}{'delta (ms)':>12}")
    for phase, at, delta in timeline(state):
        lines.append(f"  {phase:<18}{at:>10.1f}{delta:>12.1f}")
    return "\n".join(lines)

"""KV transfer over UCX (ucxx): shared memory between processes on one host, TCP or RDMA across hosts.

No listener: `create_listener` binds every interface, so peers connect by worker address instead.
`address` is "ucx://" + the worker address (url-safe base64); the puller sends its own worker
address in each request so the offering side can answer. Tagged messages, per pull:

  puller -> server, tag REQUEST_TAG:  header (magic, reply tag base, timeout, lengths, `Rows` asked for),
                                      transfer id, puller worker address, destination view sizes (u64 each)
  server -> puller, tag base:         reply (magic, status, source view count, total bytes), source sizes
  server -> puller, tag base + 1 + i: segment i of the byte stream

Both sides cut the stream at every view boundary of either side (`_segments`), so each segment is one
contiguous slice of a source view and of a destination view: UCX reads the prefill cache and writes
the decode cache directly, no copies in Python (but the copy `Rows` selects: a rank's KV heads).

Environment: UCX reads `UCX_TLS`, `UCX_NET_DEVICES` and its other variables as usual. When
`UCX_NET_DEVICES` is unset and the transport host is a loopback address, network devices are
restricted to `lo` (nothing listens on other interfaces; shared memory is not a network device).
Endpoints run without UCX error handling, since UCX picks shared memory only then; a dead or silent
peer therefore shows up as a pull timeout, not as an endpoint error. UCX does not report which
transport an endpoint chose through ucxx: `start()` logs the resources UCX may use, and
`UCX_PROTO_INFO=y` makes UCX print its per-endpoint protocol choice.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import logging
import os
import re
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.engine.api import KVView
from shared.transfer.base import (
    KVTransport,
    Rows,
    StagingPool,
    TransferError,
    TransferStats,
    byte_view,
    select_rows,
    total_nbytes,
)

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # ucxx sets UCX_MEMTYPE_CACHE, which UCX 1.21 ignores

import ucxx._lib.libucxx as ucx_api  # noqa: E402  # after the environment default above
from ucxx._lib.arr import Array  # noqa: E402
from ucxx.exceptions import UCXError  # noqa: E402
from ucxx.types import Tag  # noqa: E402

log = logging.getLogger(__name__)

PREFIX = "ucx://"
MAGIC = b"DSKV"
REQUEST_TAG = 0x44534B56_00000001  # top bit clear: never a reply tag base
_REQUEST = struct.Struct("<4sQdIIIQQQ")  # magic, reply tag base, timeout s, id length, address length, views,
#                                           rows (size, offset, length; size 0: every byte)
_REPLY = struct.Struct("<4sIIQ")  # magic, status, source view count, total bytes
_OK, _UNKNOWN, _MISMATCH, _TOO_MANY, _BAD_ROWS = 0, 1, 2, 3, 4
MAX_VIEWS = 16384  # per side; a request's KV is a few runs of blocks, so this is generous
MAX_ID = 1024
_MAX_ADDRESS = 16384
_MAX_TIMEOUT_S = 3600.0  # a pull request asking for longer is garbage
_MAX_REQUEST = _REQUEST.size + MAX_ID + _MAX_ADDRESS + 8 * MAX_VIEWS
_SEGMENT_BITS = 24  # low bits of a reply tag: 0 reply, 1.. segments
_GRACE_S = 1.0  # the server waits this long past the puller's timeout before it stops waiting on its sends
_SAFETY_PROGRESS_S = 1.0  # progress at least this often even if UCX raises no event


def parse_address(address: str) -> bytes:
    if not address.startswith(PREFIX):
        raise TransferError(f"not a ucx transport address: {address[:40]!r}")
    try:
        raw = base64.urlsafe_b64decode(address[len(PREFIX):].encode())
    except (binascii.Error, ValueError) as exc:
        raise TransferError(f"bad ucx transport address: {address[:40]!r}") from exc
    if not raw or len(raw) > _MAX_ADDRESS:
        raise TransferError(f"bad ucx transport address: {address[:40]!r}")
    return raw


def _segments(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int, int, int]]:
    """(src view, src offset, dst view, dst offset, length) for the stream cut at both sides' boundaries."""
    out: list[tuple[int, int, int, int, int]] = []
    si = di = so = do = 0
    while si < len(src) and di < len(dst):
        n = min(src[si] - so, dst[di] - do)
        if n > 0:
            out.append((si, so, di, do, n))
        so += n
        do += n
        if so == src[si]:
            si, so = si + 1, 0
        if do == dst[di]:
            di, do = di + 1, 0
    return out


def _sizes(data: bytes | np.ndarray, count: int, offset: int) -> list[int]:
    return [int(n) for n in np.frombuffer(data, dtype="<u8", count=count, offset=offset)]


@dataclass
class _Waiter:
    requests: list[Any]  # ucx_api.UCXRequest
    future: asyncio.Future[None]
    keep: object  # buffers UCX reads or writes until the requests complete
    done: int = 0


@dataclass
class _Request:
    reply_tag: int
    timeout: float
    transfer_id: str
    address: bytes
    rows: Rows | None
    dest_sizes: list[int] = field(default_factory=list)


class _Progress:
    """Drives one UCX worker from the asyncio loop, woken by the worker's epoll descriptor.

    Never busy-polls: on a shared 2-core host a spinning poller steals the time slice the peer
    process needs to answer (a 1 MiB pull took 27 ms polling, 0.8 ms event-driven), and ucxx's own
    progress thread halves bandwidth there."""

    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._worker = worker
        self._loop = loop
        self._waiters: list[_Waiter] = []
        self._orphans: list[tuple[list[Any], object]] = []
        self._closed = False
        worker.init_blocking_progress_mode()
        self._fd: int = worker.epoll_file_descriptor
        loop.add_reader(self._fd, self.drive)
        self._timer = loop.call_later(_SAFETY_PROGRESS_S, self._tick)

    def _tick(self) -> None:
        self.drive()
        self.prune()
        self._timer = self._loop.call_later(_SAFETY_PROGRESS_S, self._tick)

    def drive(self) -> None:
        if self._closed:
            return
        self._worker.progress()
        self._settle()
        while not self._worker.arm():  # arm only when UCX has nothing left to do, then wait for epoll
            self._worker.progress()
            self._settle()

    def _settle(self) -> None:
        pending = []
        for waiter in self._waiters:
            if waiter.future.done():
                continue
            reqs = waiter.requests
            try:
                while waiter.done < len(reqs) and reqs[waiter.done].completed:
                    reqs[waiter.done].check_error()
                    waiter.done += 1
            except UCXError as exc:
                waiter.future.set_exception(exc)
                continue
            if waiter.done == len(reqs):
                waiter.future.set_result(None)
            else:
                pending.append(waiter)
        self._waiters = pending

    async def wait(self, requests: list[Any], keep: object = None) -> None:
        """Until every request completed; raises the first UCX error. A waiter given up on (timeout,
        error) leaves its requests and buffers with the orphans until UCX is done with them."""
        waiter = _Waiter(requests, self._loop.create_future(), keep)
        self._waiters.append(waiter)
        self.drive()
        try:
            await waiter.future
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if not all(r.completed for r in requests):
                self._orphans.append((requests, keep))

    def adopt(self, requests: list[Any], keep: object) -> None:
        """Keep `keep` alive until `requests` completed, without waiting for them."""
        self._orphans.append((requests, keep))

    def prune(self) -> None:
        self._orphans = [(reqs, keep) for reqs, keep in self._orphans if not all(r.completed for r in reqs)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        self._loop.remove_reader(self._fd)
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_exception(TransferError("transport closed"))
        self._waiters.clear()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class UcxTransport(KVTransport):
    name = "ucx"

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self._offers: dict[str, list[KVView]] = {}
        self._worker: Any = None
        self._context: Any = None
        self._progress: _Progress | None = None
        self._endpoints: dict[bytes, Any] = {}  # peer worker address -> UCXEndpoint
        self._staging = StagingPool()
        self._address = ""

    # -- setup ------------------------------------------------------------------------------------

    async def start(self) -> None:
        options: dict[str, str] = {}
        if "UCX_NET_DEVICES" not in os.environ and _is_loopback(self.host):
            options["NET_DEVICES"] = "lo"
        try:
            self._context = ucx_api.UCXContext(options, (ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP))
            self._worker = ucx_api.UCXWorker(self._context)
        except UCXError as exc:
            raise TransferError(f"UCX could not start: {exc}") from exc
        self._progress = _Progress(self._worker, asyncio.get_running_loop())
        self._address = PREFIX + base64.urlsafe_b64encode(self._worker.address.tobytes()).decode()
        resources = re.findall(r"resource\s+\d+\s*:.*--\s*(\S+)", self._context.info)
        log.info("UCX KV transport (UCX %s): UCX_TLS=%s, net devices %s, may use %s",
                 ".".join(map(str, ucx_api.get_ucx_version())), os.environ.get("UCX_TLS", "all"),
                 self._context.config.get("NET_DEVICES", "?"), ", ".join(resources))
        self._spawn(self._serve())

    @property
    def address(self) -> str:
        if not self._address:
            raise RuntimeError("transport not started")
        return self._address

    def _endpoint(self, address: bytes) -> Any:
        ep = self._endpoints.get(address)
        if ep is None:
            ucx_address = ucx_api.UCXAddress.create_from_buffer(address)
            ep = ucx_api.UCXEndpoint.create_from_worker_address(self._worker, ucx_address, False)
            self._endpoints[address] = ep
        return ep

    def _forget(self, address: bytes) -> None:
        """Drop a broken endpoint; the next request to or from that peer opens a fresh one."""
        ep = self._endpoints.pop(address, None)
        if ep is not None:
            with contextlib.suppress(UCXError):
                ep.close()

    # -- serving (prefill side) -------------------------------------------------------------------

    def offer(self, transfer_id: str, views: Sequence[KVView]) -> None:
        self._offers[transfer_id] = list(views)

    def withdraw(self, transfer_id: str) -> None:
        self._offers.pop(transfer_id, None)

    async def _serve(self) -> None:
        assert self._progress is not None
        buf = np.empty(_MAX_REQUEST, dtype=np.uint8)
        while True:
            recv = self._worker.tag_recv(Array(buf), Tag(REQUEST_TAG))
            try:
                await self._progress.wait([recv], buf)
                request = self._parse_request(buf, self._worker.address.tobytes()[0])
            except (UCXError, ValueError) as exc:
                log.warning("dropped a bad KV pull request: %s", exc)
                continue
            self._spawn(self._answer(request))

    @staticmethod
    def _parse_request(buf: np.ndarray, own_header: int) -> _Request:
        magic, reply_tag, timeout, id_len, addr_len, n_dest, *selection = _REQUEST.unpack_from(memoryview(buf))  # type: ignore[arg-type]  # ndarray is a buffer
        if magic != MAGIC or id_len > MAX_ID or addr_len > _MAX_ADDRESS or n_dest > MAX_VIEWS:
            raise ValueError("malformed header")
        if not 0 < timeout <= _MAX_TIMEOUT_S:
            raise ValueError(f"timeout {timeout} s out of range")
        pos = _REQUEST.size
        transfer_id = bytes(buf[pos:pos + id_len]).decode()
        pos += id_len
        address = bytes(buf[pos:pos + addr_len])
        # UCX asserts (the process aborts) on an address of another format version: the low four bits of
        # its first byte. Peers run the same UCX as we do; any other address is garbage. (Measured: 400
        # addresses of our version, random or one byte corrupted, only failed to connect, as UCXError.)
        if not address or address[0] & 0x0F != own_header & 0x0F:
            raise ValueError("the reply address is not a UCX worker address of our version")
        rows = Rows(*selection) if selection[0] else None
        return _Request(reply_tag, timeout, transfer_id, address, rows, _sizes(buf, n_dest, pos + addr_len))

    async def _answer(self, request: _Request) -> None:
        assert self._progress is not None
        views = self._offers.get(request.transfer_id)
        bad_rows = False
        staged = None
        if views is not None and request.rows is not None:  # a rank's heads: copied out, then sent
            bad_rows = request.rows.problem(views) is not None
            if not bad_rows:
                staged = self._staging.take(request.rows.nbytes(total_nbytes(views)))
                views = [select_rows(views, request.rows, staged)]
        src_sizes = [byte_view(v).nbytes for v in views] if views is not None else []
        total = sum(src_sizes)
        if views is None:
            status = _UNKNOWN
        elif bad_rows:
            status = _BAD_ROWS
        elif total != sum(request.dest_sizes):
            status = _MISMATCH
        elif len(src_sizes) > MAX_VIEWS:
            status = _TOO_MANY
        else:
            status = _OK
        sizes = src_sizes if status == _OK else []
        reply = _REPLY.pack(MAGIC, status, len(sizes), total) + np.asarray(sizes, dtype="<u8").tobytes()
        keep: list[object] = [reply]
        try:
            ep = self._endpoint(request.address)
            reqs = [ep.tag_send(Array(reply), Tag(request.reply_tag))]
            if status == _OK:
                assert views is not None
                sources = [byte_view(v) for v in views]
                keep.append(sources)
                for i, (si, so, _, _, n) in enumerate(_segments(src_sizes, request.dest_sizes)):
                    reqs.append(ep.tag_send(Array(sources[si][so:so + n]), Tag(request.reply_tag + 1 + i)))
            await asyncio.wait_for(self._progress.wait(reqs, keep), request.timeout + _GRACE_S)
            if staged is not None:  # sent: UCX reads it no more (after a failure it may: then it is dropped)
                self._staging.give(staged)
        except TimeoutError:
            # The puller gave up and completed its receives itself: these sends are never matched.
            # They stay with the orphans (closing the endpoint would cancel other pulls on it too).
            log.warning("KV transfer %r: the puller stopped receiving", request.transfer_id)
        except UCXError as exc:
            log.warning("KV transfer %r to a puller failed: %s", request.transfer_id, exc)
            self._forget(request.address)

    # -- pulling (decode side) --------------------------------------------------------------------

    async def pull(self, peer_address: str, transfer_id: str, dest: Sequence[KVView], timeout: float,
                   rows: Rows | None = None) -> TransferStats:
        if self._progress is None:
            raise RuntimeError("transport not started")
        start = time.perf_counter()
        peer = parse_address(peer_address)
        key = transfer_id.encode()
        if len(key) > MAX_ID:
            raise TransferError(f"transfer id longer than {MAX_ID} bytes")
        if len(dest) > MAX_VIEWS:
            raise TransferError(f"{len(dest)} destination views; at most {MAX_VIEWS}")
        targets = [byte_view(v) for v in dest]
        posted: list[tuple[Any, int]] = []  # (receive request, tag) posted into `targets` or a reply buffer
        try:
            async with asyncio.timeout(timeout):
                nbytes = await self._pull(peer, key, targets, timeout, rows, posted)
        except TimeoutError as exc:
            exposed = self._retire(posted, peer, targets)
            raise TransferError(f"pull of {transfer_id!r} from a ucx peer timed out after {timeout}s",
                                exposed) from exc
        except UCXError as exc:
            exposed = self._retire(posted, peer, targets)
            raise TransferError(f"pull of {transfer_id!r} from a ucx peer failed: {exc}", exposed) from exc
        except BaseException:
            self._retire(posted, peer, targets)
            raise
        return TransferStats(nbytes, time.perf_counter() - start, self.name)

    def _retire(self, posted: list[tuple[Any, int]], peer: bytes,
                targets: list[memoryview]) -> Callable[[], bool] | None:
        """Complete a failed pull's pending receives, so that no late message from the peer lands in
        memory the caller reuses after the error: first with one-byte messages from ourselves (ucxx has
        no per-request cancel); a receive already matched by a transfer under way (a link cut mid-pull,
        then back) takes closing the endpoint to the peer, which cancels what it has in flight. What
        still has not completed is returned as `exposed` (TransferError): its memory is not reusable yet."""
        pending = [(req, tag) for req, tag in posted if not req.completed]
        if not pending or self._progress is None:
            return None
        ep = self._endpoint(self._worker.address.tobytes())
        poison = b"\0"
        sends = [ep.tag_send(Array(poison), Tag(tag)) for _, tag in pending]
        for _ in range(3):
            self._progress.drive()
        receives = [req for req, _ in pending if not req.completed]
        self._progress.adopt(sends, poison)
        if not receives:
            return None
        self._forget(peer)
        for _ in range(3):
            self._progress.drive()
        self._progress.adopt(receives, targets)  # a staging buffer stays alive until they complete
        if all(req.completed for req in receives):
            return None
        log.warning("a failed KV pull still has %d receives in flight; its destination stays reserved until they "
                    "complete", sum(not r.completed for r in receives))
        return lambda: not all(req.completed for req in receives)

    async def _pull(self, peer: bytes, key: bytes, targets: list[memoryview], timeout: float, rows: Rows | None,
                    posted: list[tuple[Any, int]]) -> int:
        assert self._progress is not None
        dest_sizes = [t.nbytes for t in targets]
        own = self._worker.address.tobytes()
        reply_tag = (1 << 63) | (secrets.randbits(63 - _SEGMENT_BITS) << _SEGMENT_BITS)
        selection = (rows.size, rows.offset, rows.length) if rows is not None else (0, 0, 0)
        message = (_REQUEST.pack(MAGIC, reply_tag, timeout, len(key), len(own), len(targets), *selection) + key + own
                   + np.asarray(dest_sizes, dtype="<u8").tobytes())
        reply = np.empty(_REPLY.size + 8 * MAX_VIEWS, dtype=np.uint8)
        ep = self._endpoint(peer)
        recv = ep.tag_recv(Array(reply), Tag(reply_tag))
        posted.append((recv, reply_tag))
        send = ep.tag_send(Array(message), Tag(REQUEST_TAG))
        await self._progress.wait([send, recv], (message, reply))

        magic, status, n_src, total = _REPLY.unpack_from(memoryview(reply))  # type: ignore[arg-type]  # ndarray is a buffer
        expected = sum(dest_sizes)
        if magic != MAGIC:
            raise TransferError("malformed reply from the ucx peer")
        if status == _UNKNOWN:
            raise TransferError(f"peer has no transfer {key.decode()!r} (withdrawn?)")
        if status == _MISMATCH:
            raise TransferError(f"transfer {key.decode()!r} has {total} bytes, destination {expected}")
        if status == _TOO_MANY:
            raise TransferError(f"transfer {key.decode()!r} has more than {MAX_VIEWS} views")
        if status == _BAD_ROWS:
            raise TransferError(f"transfer {key.decode()!r} cannot be cut into {rows}")
        src_sizes = _sizes(reply, n_src, _REPLY.size)
        reqs = []
        for i, (_, _, di, do, n) in enumerate(_segments(src_sizes, dest_sizes)):
            tag = reply_tag + 1 + i
            reqs.append(ep.tag_recv(Array(targets[di][do:do + n]), Tag(tag)))
            posted.append((reqs[-1], tag))
        await self._progress.wait(reqs, targets)
        return total

    async def close(self) -> None:
        self._offers.clear()
        await self._cancel_tasks()
        if self._worker is None:
            return
        with contextlib.suppress(UCXError):
            self._worker.cancel_inflight_requests()
        for address in list(self._endpoints):
            self._forget(address)
        if self._progress is not None:
            self._progress.close()
        self._progress = None
        self._worker = None
        self._context = None

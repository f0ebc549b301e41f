"""KV transfer over plain TCP: the decode side asks for a transfer id, the prefill side streams it.

Wire format, per pull, on a connection the puller keeps open for its next pulls to the same peer:
  puller -> server:  b"DSKV", u16 id length, u64 x 3 rows (size, offset, length; size 0: every byte), id (utf-8)
  server -> puller:  u8 status (0 ok, 1 unknown id, 2 rows that do not fit), u64 byte count, then the bytes
Bytes go straight from the prefill cache's views to the socket (`sock_sendall(memoryview)`) and
from the socket into the decode cache's reserved views (`sock_recv_into`): no copies in Python, except
the copy `Rows` selects (a rank's KV heads).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Sequence

from shared.engine.api import KVView
from shared.transfer.base import (
    KVTransport,
    Rows,
    StagingPool,
    TransferError,
    TransferStats,
    byte_view,
    chunks,
    select_rows,
    total_nbytes,
)

MAGIC = b"DSKV"
_REQUEST = struct.Struct("!4sHQQQ")
_REPLY = struct.Struct("!BQ")
_OK, _UNKNOWN, _BAD_ROWS = 0, 1, 2
_CHUNK = 4 << 20  # bytes per send/recv call: big enough for few syscalls, small enough to interleave
_SOCKET_BUFFER = 4 << 20


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)


async def _recv_exact(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise ConnectionError("connection closed")
        got += k
    return bytes(buf)


def parse_address(address: str) -> tuple[str, int]:
    if not address.startswith("tcp://"):
        raise TransferError(f"not a tcp transport address: {address!r}")
    host, _, port = address[len("tcp://"):].rpartition(":")
    if not host or not port.isdigit():
        raise TransferError(f"bad tcp transport address: {address!r}")
    return host, int(port)


class TcpTransport(KVTransport):
    name = "tcp"

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self._offers: dict[str, list[KVView]] = {}
        self._listener: socket.socket | None = None
        self._port = 0
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}  # pooled client connections
        self._staging = StagingPool()

    # -- serving (prefill side) -------------------------------------------------------------------

    async def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._spawn(self._accept_loop(listener))

    @property
    def address(self) -> str:
        if self._listener is None:
            raise RuntimeError("transport not started")
        return f"tcp://{self.host}:{self._port}"

    def offer(self, transfer_id: str, views: Sequence[KVView]) -> None:
        self._offers[transfer_id] = list(views)

    def withdraw(self, transfer_id: str) -> None:
        self._offers.pop(transfer_id, None)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            _tune(conn)
            self._spawn(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    magic, length, *selection = _REQUEST.unpack(await _recv_exact(conn, _REQUEST.size))
                except ConnectionError:
                    return  # the puller closed its pooled connection
                if magic != MAGIC:
                    return
                transfer_id = (await _recv_exact(conn, length)).decode(errors="replace")
                views = self._offers.get(transfer_id)
                if views is None:
                    await loop.sock_sendall(conn, _REPLY.pack(_UNKNOWN, 0))
                    continue
                staged = None
                if selection[0]:
                    rows = Rows(*selection)
                    if rows.problem(views):
                        await loop.sock_sendall(conn, _REPLY.pack(_BAD_ROWS, 0))
                        continue
                    staged = self._staging.take(rows.nbytes(total_nbytes(views)))
                    views = [select_rows(views, rows, staged)]
                try:
                    await loop.sock_sendall(conn, _REPLY.pack(_OK, total_nbytes(views)))
                    for chunk in chunks(views, _CHUNK):
                        await loop.sock_sendall(conn, chunk)
                finally:
                    if staged is not None:  # in the kernel's buffers by now, or never to be sent
                        self._staging.give(staged)
        except (ConnectionError, OSError):
            return
        finally:
            conn.close()

    # -- pulling (decode side) --------------------------------------------------------------------

    async def pull(self, peer_address: str, transfer_id: str, dest: Sequence[KVView], timeout: float,
                   rows: Rows | None = None) -> TransferStats:
        start = time.perf_counter()
        try:
            peer = parse_address(peer_address)
            nbytes = await asyncio.wait_for(self._pull(peer, transfer_id, dest, rows), timeout)
        except TimeoutError as exc:
            raise TransferError(f"pull of {transfer_id!r} from {peer_address} timed out") from exc
        except (ConnectionError, OSError) as exc:
            raise TransferError(f"pull of {transfer_id!r} from {peer_address} failed: {exc}") from exc
        return TransferStats(nbytes, time.perf_counter() - start, self.name)

    async def _pull(self, peer: tuple[str, int], transfer_id: str, dest: Sequence[KVView], rows: Rows | None) -> int:
        loop = asyncio.get_running_loop()
        idle = self._idle.setdefault(peer, [])
        conn = idle.pop() if idle else await self._connect(peer)
        reusable = False
        try:
            key = transfer_id.encode()
            selection = (rows.size, rows.offset, rows.length) if rows is not None else (0, 0, 0)
            request = _REQUEST.pack(MAGIC, len(key), *selection) + key
            try:
                await loop.sock_sendall(conn, request)
                status, nbytes = _REPLY.unpack(await _recv_exact(conn, _REPLY.size))
            except (ConnectionError, OSError):
                conn.close()  # a pooled connection the peer closed: retry once on a fresh one
                conn = await self._connect(peer)
                await loop.sock_sendall(conn, request)
                status, nbytes = _REPLY.unpack(await _recv_exact(conn, _REPLY.size))
            if status == _UNKNOWN:
                reusable = True
                raise TransferError(f"peer {peer[0]}:{peer[1]} has no transfer {transfer_id!r} (withdrawn?)")
            if status == _BAD_ROWS:
                reusable = True
                raise TransferError(f"transfer {transfer_id!r} cannot be cut into {rows}")
            expected = total_nbytes(dest)
            if nbytes != expected:
                raise TransferError(f"transfer {transfer_id!r} has {nbytes} bytes, destination {expected}")
            for view in dest:
                data = byte_view(view)
                got = 0
                while got < len(data):
                    k = await loop.sock_recv_into(conn, data[got:got + _CHUNK])
                    if k == 0:
                        raise ConnectionError("peer closed the connection mid-transfer")
                    got += k
            reusable = True
            return nbytes
        finally:
            if reusable:
                idle.append(conn)
            else:
                conn.close()

    async def _connect(self, peer: tuple[str, int]) -> socket.socket:
        loop = asyncio.get_running_loop()
        conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _tune(conn)
        try:
            await loop.sock_connect(conn, peer)
        except OSError:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        self._offers.clear()
        await self._cancel_tasks()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

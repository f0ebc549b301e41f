"""The TCP KV transport moves exact bytes between views of different shapes, and fails loudly."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from shared.transfer import KVTransport, TransferError, create_transport
from shared.transfer.base import total_nbytes


def _blocks(seed: int, sizes: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 64, generator=gen) for n in sizes]


def _flat(views: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1).view(torch.uint8) for v in views])


@pytest.fixture
async def pair() -> object:
    server, client = create_transport("tcp"), create_transport("tcp")
    await server.start()
    await client.start()
    yield server, client
    await client.close()
    await server.close()
    await server.close()  # safe twice


async def test_pull_fills_differently_split_views_and_pools_connections(
        pair: tuple[KVTransport, KVTransport]) -> None:
    server, client = pair
    src = _blocks(0, [16, 48, 8])
    server.offer("req-1", src)
    dest = [torch.empty(40, 3, 64), torch.empty(32, 3, 64)]  # same 72 rows, split elsewhere
    stats = await client.pull(server.address, "req-1", dest, timeout=10)
    assert stats.nbytes == total_nbytes(src) == 72 * 3 * 64 * 4 and stats.transport == "tcp"
    assert torch.equal(_flat(src), _flat(dest))
    again = [torch.empty(72, 3, 64)]
    await client.pull(server.address, "req-1", again, timeout=10)  # reuses the pooled connection
    assert torch.equal(_flat(src), _flat(again))


async def test_concurrent_pulls(pair: tuple[KVTransport, KVTransport]) -> None:
    server, client = pair
    sources = {f"r{i}": _blocks(i, [16 * (i + 1)]) for i in range(8)}
    for rid, views in sources.items():
        server.offer(rid, views)
    dests = {rid: [torch.empty_like(v[0])] for rid, v in sources.items()}
    await asyncio.gather(*(client.pull(server.address, rid, dests[rid], 10) for rid in sources))
    for rid in sources:
        assert torch.equal(sources[rid][0], dests[rid][0])


async def test_unknown_withdrawn_and_mismatched_transfers_fail(pair: tuple[KVTransport, KVTransport]) -> None:
    server, client = pair
    with pytest.raises(TransferError, match="no transfer"):
        await client.pull(server.address, "nope", [torch.empty(4)], timeout=5)
    server.offer("gone", [torch.ones(4)])
    server.withdraw("gone")
    with pytest.raises(TransferError, match="no transfer"):
        await client.pull(server.address, "gone", [torch.empty(4)], timeout=5)
    server.offer("short", [torch.ones(4)])
    with pytest.raises(TransferError, match="bytes"):
        await client.pull(server.address, "short", [torch.empty(8)], timeout=5)
    server.offer("ok", [torch.arange(4.0)])  # the transport still works after the failures
    dest = [torch.empty(4)]
    await client.pull(server.address, "ok", dest, timeout=5)
    assert dest[0].tolist() == [0.0, 1.0, 2.0, 3.0]


async def test_silent_or_absent_peer_is_an_error_not_a_hang() -> None:
    client = create_transport("tcp")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts (in the kernel backlog) but never answers
    try:
        with pytest.raises(TransferError, match="timed out"):
            await client.pull(f"tcp://127.0.0.1:{silent.getsockname()[1]}", "x", [torch.empty(4)], 0.3)
        port = silent.getsockname()[1]
        silent.close()
        with pytest.raises(TransferError):
            await client.pull(f"tcp://127.0.0.1:{port}", "x", [torch.empty(4)], 2)
        with pytest.raises(TransferError, match="address"):
            await client.pull("ucx://whatever", "x", [torch.empty(4)], 2)
    finally:
        silent.close()
        await client.close()


async def test_pull_from_another_process() -> None:
    server_code = textwrap.dedent("""
        import asyncio, sys, torch
        from shared.transfer import create_transport
        async def main():
            t = create_transport("tcp")
            await t.start()
            g = torch.Generator().manual_seed(7)
            t.offer("cross", [torch.randn(1000, 64, generator=g), torch.randn(24, 64, generator=g)])
            print(t.address, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            await t.close()
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", server_code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        address = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        client = create_transport("tcp")
        dest = [torch.empty(512, 64), torch.empty(512, 64)]
        stats = await client.pull(address.strip(), "cross", dest, timeout=30)
        await client.close()
        g = torch.Generator().manual_seed(7)
        expected = torch.cat([torch.randn(1000, 64, generator=g), torch.randn(24, 64, generator=g)])
        assert stats.nbytes == 1024 * 64 * 4
        assert torch.equal(torch.cat(dest), expected)
    finally:
        proc.communicate("", timeout=30)
    assert proc.returncode == 0


def test_registry_names_transports() -> None:
    assert create_transport("tcp").name == "tcp"
    with pytest.raises(ValueError, match="unknown KV transport"):
        create_transport("carrier-pigeon")

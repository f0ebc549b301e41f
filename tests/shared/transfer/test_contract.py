"""The KV transfer contract (shared/transfer/base.py), checked on every transport installed here.

Transport-specific behaviour (connection pooling, peers in other processes, UCX's cancelled
receives) is tested in test_tcp.py and test_ucx.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator

import pytest
import torch

from shared.transfer import KVTransport, TransferError
from shared.transfer.base import Rows, StagingPool, total_nbytes
from tests.shared.transfer.conftest import transport_pair

TRANSPORTS = ["tcp", pytest.param("ucx", marks=pytest.mark.skipif(importlib.util.find_spec("ucxx") is None,
                                                                   reason="ucxx is not installed"))]


def blocks(seed: int, sizes: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 64, generator=gen) for n in sizes]


def flat(views: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1).view(torch.uint8) for v in views])


@pytest.fixture(params=TRANSPORTS)
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[KVTransport, KVTransport]]:
    async with transport_pair(request.param) as started:
        yield started


async def test_pull_fills_differently_split_views(pair: tuple[KVTransport, KVTransport]) -> None:
    server, client = pair
    assert server.address.startswith(f"{server.name}://")
    src = blocks(0, [16, 48, 8])
    server.offer("req-1", src)
    dest = [torch.empty(40, 3, 64), torch.empty(32, 3, 64)]  # same 72 rows, split elsewhere
    stats = await client.pull(server.address, "req-1", dest, timeout=10)
    assert stats.nbytes == total_nbytes(src) == 72 * 3 * 64 * 4 and stats.transport == server.name
    assert torch.equal(flat(src), flat(dest))
    again = [torch.empty(72, 3, 64)]
    await client.pull(server.address, "req-1", again, timeout=10)  # reuses the connection / endpoint
    assert torch.equal(flat(src), flat(again))


async def test_pull_of_rows_takes_those_columns_of_every_row(pair: tuple[KVTransport, KVTransport]) -> None:
    """A tensor-parallel rank's KV heads: the same bytes of every row, from views split anywhere."""
    server, client = pair
    src = blocks(1, [16, 48, 8])  # 72 rows of 3 x 64 floats; take the middle 64 floats of each
    server.offer("req-1", src)
    row = 3 * 64 * 4
    dest = [torch.empty(30, 64), torch.empty(42, 64)]
    stats = await client.pull(server.address, "req-1", dest, 10, Rows(row, 64 * 4, 64 * 4))
    assert stats.nbytes == 72 * 64 * 4
    assert torch.equal(torch.cat(dest), torch.cat(src)[:, 1])
    for bad in (Rows(row, 64 * 4, row), Rows(7, 0, 1), Rows(row, 0, 0)):  # past the row; rows across views; empty
        with pytest.raises(TransferError, match="cannot be cut"):
            await client.pull(server.address, "req-1", [torch.empty(1)], 10, bad)
    await client.pull(server.address, "req-1", dest, 10, Rows(row, 0, 64 * 4))  # still serving
    assert torch.equal(torch.cat(dest), torch.cat(src)[:, 0])


async def test_concurrent_pulls(pair: tuple[KVTransport, KVTransport]) -> None:
    server, client = pair
    sources = {f"r{i}": blocks(i, [16 * (i + 1)]) for i in range(8)}
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
    other = "ucx://AAAA" if server.name == "tcp" else "tcp://127.0.0.1:1"
    with pytest.raises(TransferError, match="address"):
        await client.pull(other, "short", [torch.empty(4)], timeout=5)
    server.offer("ok", [torch.arange(4.0)])  # the transport still works after the failures
    dest = [torch.empty(4)]
    await client.pull(server.address, "ok", dest, timeout=5)
    assert dest[0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_the_staging_pool_reuses_what_was_given_back_up_to_its_cap() -> None:
    pool = StagingPool(max_bytes=300)
    small, big = pool.take(100), pool.take(200)
    assert pool.take(100) is not small  # both out: a new one
    pool.give(small)
    pool.give(big)
    assert pool.take(150) is big and pool.take(50) is small  # the smallest that fits
    pool.give(pool.take(250))  # 100 + 200 + 250 > 300: the smallest kept go first
    pool.give(small)
    pool.give(big)
    assert sorted(b.nbytes for b in pool._free) == [250]

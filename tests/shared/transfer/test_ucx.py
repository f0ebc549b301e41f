"""The UCX KV transport: segmenting, cancelled pulls, peers in other processes (the shared contract:
test_contract.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch

pytest.importorskip("shared.transfer.ucx", exc_type=ImportError)  # skips where ucxx is not installed

from shared.transfer import KVTransport, TransferError, create_transport  # noqa: E402
from shared.transfer.ucx import _segments  # noqa: E402
from tests.shared.transfer.conftest import transport_pair  # noqa: E402


def _blocks(seed: int, sizes: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 64, generator=gen) for n in sizes]



@pytest.fixture
async def pair() -> AsyncIterator[tuple[KVTransport, KVTransport]]:
    async with transport_pair("ucx") as started:
        yield started


def test_segments_cut_at_both_sides_boundaries() -> None:
    assert _segments([4, 6], [3, 7]) == [(0, 0, 0, 0, 3), (0, 3, 1, 0, 1), (1, 0, 1, 1, 6)]
    assert _segments([0, 5], [5]) == [(1, 0, 0, 0, 5)]  # empty views carry nothing





async def test_a_timed_out_pull_leaves_no_receive_behind(pair: tuple[KVTransport, KVTransport]) -> None:
    server, client = pair
    big = torch.randn(4 << 20)  # 16 MiB: cannot arrive within the timeout below
    server.offer("big", [big])
    dest = torch.zeros(4 << 20)
    with pytest.raises(TransferError, match="timed out"):
        await client.pull(server.address, "big", [dest], timeout=1e-4)
    await asyncio.sleep(0.2)  # anything still in flight to the abandoned receives would land now
    assert not torch.equal(dest, big)
    small = _blocks(3, [8])
    server.offer("next", small)
    again = [torch.empty(8, 3, 64)]
    await client.pull(server.address, "next", again, timeout=10)  # the endpoint still works
    assert torch.equal(small[0], again[0])


SERVER = textwrap.dedent("""
    import asyncio, sys, torch
    from shared.transfer import create_transport
    async def main():
        t = create_transport("ucx")
        await t.start()
        g = torch.Generator().manual_seed(7)
        t.offer("cross", [torch.randn(1000, 64, generator=g), torch.randn(24, 64, generator=g)])
        print(t.address, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await t.close()
    asyncio.run(main())
""")


async def _spawn_server(env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    address = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
    return proc, address.strip()


def _expected() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.cat([torch.randn(1000, 64, generator=g), torch.randn(24, 64, generator=g)])


@pytest.mark.parametrize("tls", [None, "tcp,self"], ids=["default", "tcp"])
async def test_pull_from_another_process_then_from_a_killed_one(tls: str | None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"UCX_TLS": tls} if tls else {}  # default: shared memory; tcp: what crosses hosts
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    proc, address = await _spawn_server(env)
    client = create_transport("ucx")
    await client.start()
    try:
        dest = [torch.empty(512, 64), torch.empty(512, 64)]
        stats = await client.pull(address, "cross", dest, timeout=30)
        assert stats.nbytes == 1024 * 64 * 4
        assert torch.equal(torch.cat(dest), _expected())
        with pytest.raises(TransferError, match="no transfer"):
            await client.pull(address, "unknown", dest, timeout=30)
        proc.kill()
        proc.wait(timeout=30)
        with pytest.raises(TransferError):  # the endpoint to the dead peer fails, it does not hang
            await asyncio.wait_for(client.pull(address, "cross", dest, timeout=1.0), 30)
    finally:
        await client.close()
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_registry_names_ucx_and_auto_prefers_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert create_transport("ucx").name == "ucx"
    assert create_transport("auto").name == "ucx"
    monkeypatch.setitem(sys.modules, "shared.transfer.ucx", None)  # as if ucxx were not installed
    assert create_transport("auto").name == "tcp"
    with pytest.raises(ValueError, match="not available"):
        create_transport("ucx")


async def test_garbage_pull_requests_are_dropped_and_pulls_go_on(pair: tuple[KVTransport, KVTransport]) -> None:
    """Tagged messages a peer could send: random bytes, a bad id, an absurd timeout, and reply addresses
    that are not worker addresses (one of another UCX address version made UCX abort the process)."""
    from ucxx._lib.arr import Array

    from shared.transfer.ucx import _REQUEST, MAGIC, REQUEST_TAG, Tag, UcxTransport, parse_address

    server, client = pair
    assert isinstance(client, UcxTransport) and client._progress is not None
    views = [torch.randn(4, 3, 64)]
    server.offer("x", views)
    size = np.asarray([views[0].nbytes], dtype="<u8").tobytes()
    own = client._worker.address.tobytes()
    other_version = bytes([(own[0] & 0xF0) | ((own[0] + 5) & 0x0F)]) + own[1:]

    def request(transfer_id: bytes, address: bytes, timeout: float = 1.0) -> bytes:
        header = _REQUEST.pack(MAGIC, 1 << 63, timeout, len(transfer_id), len(address), 1, 0, 0, 0)
        return header + transfer_id + address + size

    messages = [os.urandom(100), request(b"\xff\xfe", own), request(b"x", own, timeout=1e30),
                request(b"x", other_version), request(b"x", own[:1] + os.urandom(len(own) - 1)), request(b"x", b"")]
    ep = client._endpoint(parse_address(server.address))
    for message in messages:
        buf = np.frombuffer(message, dtype=np.uint8).copy()
        await client._progress.wait([ep.tag_send(Array(buf), Tag(REQUEST_TAG))], buf)
    await asyncio.sleep(0.3)
    dest = [torch.empty(4, 3, 64)]
    await client.pull(server.address, "x", dest, timeout=5)
    assert torch.equal(dest[0], views[0])

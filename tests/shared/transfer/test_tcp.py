"""The TCP KV transport across processes and against dead peers (the shared contract: test_contract.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from shared.transfer import TransferError, create_transport
from shared.transfer.tcp import parse_address
from tests.shared.transfer.conftest import transport_pair


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


async def test_garbage_on_the_port_is_dropped_and_pulls_go_on() -> None:
    async with transport_pair("tcp") as (server, client):
        views = [torch.randn(4, 3, 64)]
        server.offer("x", views)
        host, port = parse_address(server.address)
        for payload in (os.urandom(4096), b"DSKV\x00\x04\xff\xfe\xfd\xfc", b"DSKV\xff\xff" + b"\0" * 10, b""):
            _, writer = await asyncio.open_connection(host, port)
            writer.write(payload)
            await writer.drain()
            writer.close()
        await asyncio.sleep(0.2)
        dest = [torch.empty(4, 3, 64)]
        await client.pull(server.address, "x", dest, timeout=5)
        assert torch.equal(dest[0], views[0])

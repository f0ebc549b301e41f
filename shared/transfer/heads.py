"""Pulling a request's KV by KV heads: what each rank of a tensor-parallel decode instance takes from each
rank of a tensor-parallel prefill instance.

A request's KV is [blocks, layers, 2, block_size, kv_heads, head_dim] (the whole model's layout): a row of
every head's vector at each block, layer, K or V, and slot. Tensor parallelism splits it by head, each rank
holding a contiguous range (`Shard.part`). A prefill instance at tp > 1 offers it as one source per rank,
each that rank's heads (`KVMeta.shard_heads` says how many, in order; `KVHandle.shard_addresses` where), so
no rank copies another's heads. A decode rank holding heads [start, stop) (`HeadShare`) pulls, from each
source, the heads they share: whole when it needs all of that source's, else as `Rows` of its stream.

One source giving exactly the destination's heads (the same tp on both sides, or tp 1 to tp 1) is pulled
straight into the destination views; otherwise each source's part lands in a buffer of its own, all pulled
at once, and is copied into its columns of the destination's rows.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from shared.engine.api import HeadShare, KVImport
from shared.protocol import KVHandle
from shared.transfer.base import KVTransport, Rows, TransferError, TransferStats, byte_view, total_nbytes


@dataclass(frozen=True)
class Source:
    address: str
    rows: Rows | None  # None: the source's whole stream
    columns: tuple[int, int]  # the bytes of each destination row these fill


def plan(kv: KVHandle, want: HeadShare) -> list[Source]:
    """What to pull from which source for the heads `want` holds."""
    counts = kv.meta.shard_heads or [want.total]
    addresses = [kv.address, *kv.shard_addresses]
    if len(addresses) != len(counts) or sum(counts) != want.total or min(counts) < 1:
        raise TransferError(f"the KV is offered as {len(addresses)} sources of {counts} heads; this model has "
                            f"{want.total} KV heads")
    sources, start, unit = [], 0, want.head_bytes
    for address, count in zip(addresses, counts, strict=True):
        first, last = max(start, want.start), min(start + count, want.stop)  # the heads both hold
        if first < last:
            whole = (first, last) == (start, start + count)
            rows = None if whole else Rows(count * unit, (first - start) * unit, (last - first) * unit)
            sources.append(Source(address, rows, ((first - want.start) * unit, (last - want.start) * unit)))
        start += count
    return sources


async def pull_heads(transport: KVTransport, kv: KVHandle, dest: KVImport, timeout: float) -> TransferStats:
    """Fill `dest` with its heads of the request's KV, from every source that has some of them."""
    if dest.heads is None:
        if kv.shard_addresses:
            raise TransferError("this engine takes KV from one source; this KV is offered by tensor-parallel ranks")
        return await transport.pull(kv.address, kv.transfer_id, dest.views, timeout)
    sources = plan(kv, dest.heads)
    width = dest.heads.row_bytes
    if len(sources) == 1 and sources[0].columns == (0, width):
        return await transport.pull(sources[0].address, kv.transfer_id, dest.views, timeout, sources[0].rows)
    num_rows = total_nbytes(dest.views) // width
    parts = [np.empty((num_rows, stop - start), dtype=np.uint8) for start, stop in (s.columns for s in sources)]
    started = time.perf_counter()
    results = await asyncio.gather(*(transport.pull(source.address, kv.transfer_id, [part], timeout, source.rows)
                                     for source, part in zip(sources, parts, strict=True)), return_exceptions=True)
    for result in results:
        if isinstance(result, TransferError):  # the parts are this pull's own: no late byte reaches `dest`
            raise TransferError(str(result)) from result
        if isinstance(result, BaseException):
            raise result
    row = 0
    for view in dest.views:
        target = np.asarray(byte_view(view)).reshape(-1, width)
        for source, part in zip(sources, parts, strict=True):
            target[:, source.columns[0]:source.columns[1]] = part[row:row + len(target)]
        row += len(target)
    return TransferStats(sum(r.nbytes for r in results if isinstance(r, TransferStats)),
                         time.perf_counter() - started, transport.name)

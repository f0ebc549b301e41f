"""`distserve bench transfer`: KV transfer bandwidth of each transport next to this machine's memcpy.

For every transport available here (UCX over shared memory, UCX over TCP, plain TCP), a child
process offers buffers of each size and a typical request's KV cache; this process pulls them the
way a decode worker does (`KVTransport.pull` into preallocated views) and reports the median time
after warm-up pulls. The reference is a single-thread memcpy of the same size (one core copying, as
UCX's shared-memory copy does), timed right after each pull so that both see the same machine load.
The KV of one prompt is set against that prompt's prefill time (TTFT), measured with the engine or
given with `--ttft-ms`. The same KV is also pulled as a rank of a TP2 decode instance pulls it from a
TP1 prefill instance: two of every three heads' bytes (`Rows`, which the offering side cuts out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from shared.argtypes import names_from, positive_int, positive_ints
from shared.transfer import KVTransport, create_transport
from shared.transfer.base import Rows

MiB = 1 << 20
# Default model (SmolLM2-135M): K and V x 30 layers x 3 KV heads x head_dim 64 x fp32, per token.
DEFAULT_KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4
KV_SOURCE_VIEWS = 4  # a request's KV is a few runs of consecutive blocks; the sides split it differently
KV_DEST_VIEWS = 3
HEAD_BYTES = 64 * 4  # one KV head's vector (head_dim 64, fp32); the default model has 3 KV heads per row
TP2_RANK0 = Rows(3 * HEAD_BYTES, 0, 2 * HEAD_BYTES)  # rank 0 of a TP2 decode instance: 2 of the 3 heads
KV_ITEM, HEADS_ITEM = "KV of one prompt", "its TP2 rank-0 heads (Rows)"


@dataclass(frozen=True)
class Item:
    source: list[int]  # view sizes in bytes
    dest: list[int]
    rows: Rows | None = None  # pulled as these rows of the source (under the source's transfer id)
    offered_as: str = ""  # the transfer id, if not the item's name


@dataclass(frozen=True)
class Variant:
    label: str
    transport: str
    env: dict[str, str]


VARIANTS = {
    "ucx-sm": Variant("UCX shared memory (UCX_TLS=sm,self; UCX picks CMA reads for large messages)", "ucx",
                      {"UCX_TLS": "sm,self"}),
    "ucx-tcp": Variant("UCX over TCP (UCX_TLS=tcp,self)", "ucx", {"UCX_TLS": "tcp,self"}),
    "tcp": Variant("plain TCP transport (asyncio sockets, loopback)", "tcp", {}),
}


@dataclass(frozen=True)
class Result:
    variant: str
    item: str
    nbytes: int
    seconds: float  # median pull time
    memcpy_seconds: float  # median single-thread copy of as many bytes, timed between the pulls

    @property
    def bytes_s(self) -> float:
        return self.nbytes / self.seconds

    @property
    def memcpy_bytes_s(self) -> float:
        return self.nbytes / self.memcpy_seconds


def split(nbytes: int, parts: int, unit: int = 1) -> list[int]:
    """`parts` sizes adding up to nbytes, each a multiple of `unit` (nbytes must be one)."""
    units = nbytes // unit
    base = units // parts
    return [base * unit] * (parts - 1) + [(units - base * (parts - 1)) * unit]


def items(sizes_mib: list[int], kv_bytes: int) -> dict[str, Item]:
    """What is pulled, by name; the KV's views are whole rows (as a cache's blocks are)."""
    out = {f"{m} MiB": Item([m * MiB], [m * MiB]) for m in sizes_mib}
    row = TP2_RANK0.size
    out[KV_ITEM] = Item(split(kv_bytes, KV_SOURCE_VIEWS, row), split(kv_bytes, KV_DEST_VIEWS, row))
    if kv_bytes % row == 0:  # rows of the default model's KV
        out[HEADS_ITEM] = Item([], split(TP2_RANK0.nbytes(kv_bytes), KV_DEST_VIEWS, TP2_RANK0.length), TP2_RANK0,
                               offered_as=KV_ITEM)
    return out


def buffers(sizes: list[int]) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in sizes]


async def _serve(transport_name: str, plan: dict[str, Item]) -> None:
    transport = create_transport(transport_name)
    await transport.start()
    for name, item in plan.items():
        if not item.offered_as:
            transport.offer(name, buffers(item.source))
    print(transport.address, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await transport.close()


def serve_main() -> None:
    """Child process: `python -c 'from services.bench.transfer import serve_main; serve_main()' NAME SIZES KV`."""
    name, sizes, kv = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3])
    asyncio.run(_serve(name, items(sizes, kv)))


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Set variables for this process (UCX reads them when a transport starts) and restore them."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def _pull_all(client: KVTransport, address: str, plan: dict[str, Item], key: str, warmup: int,
                    repeat: int) -> list[Result]:
    results = []
    for name, item in plan.items():
        dest = [torch.zeros(n, dtype=torch.uint8) for n in item.dest]  # touched: no page faults while timed
        copy_src = np.random.randint(0, 256, sum(item.dest), dtype=np.uint8)
        copy_dst = np.zeros_like(copy_src)
        times, copies = [], []
        for i in range(warmup + repeat):
            stats = await client.pull(address, item.offered_as or name, dest, timeout=120, rows=item.rows)
            start = time.perf_counter()
            np.copyto(copy_dst, copy_src)  # numpy copies on one thread
            if i >= warmup:
                times.append(stats.seconds)
                copies.append(time.perf_counter() - start)
        results.append(Result(key, name, sum(item.dest), statistics.median(times), statistics.median(copies)))
    return results


def bench_variant(key: str, plan: dict[str, Item], sizes: list[int], kv_bytes: int,
                  warmup: int, repeat: int) -> list[Result]:
    variant = VARIANTS[key]
    code = "from services.bench.transfer import serve_main; serve_main()"
    args = [sys.executable, "-c", code, variant.transport, ",".join(map(str, sizes)), str(kv_bytes)]
    child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **variant.env})
    try:
        assert child.stdout is not None
        address = child.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"the offering process for {key} exited with {child.wait()}")

        async def run() -> list[Result]:
            with environment(variant.env):
                client = create_transport(variant.transport)
                await client.start()
            try:
                return await _pull_all(client, address, plan, key, warmup, repeat)
            finally:
                await client.close()

        return asyncio.run(run())
    finally:
        child.communicate("", timeout=60)


def measure_ttft(model: str, tokens: int, threads: int | None, warmup: int, repeat: int) -> tuple[float, int]:
    """Median time of one prefill step of a `tokens`-token prompt, and the KV bytes per token."""
    from shared.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=model, num_threads=threads, max_num_batched_tokens=tokens))
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    generator = torch.Generator().manual_seed(tokens)
    times = []
    for i in range(warmup + repeat):
        prompt = torch.randint(3, engine.model_config.vocab_size, (tokens,), generator=generator).tolist()
        engine.add_request(f"ttft-{i}", prompt, params)
        start = time.perf_counter()
        engine.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    per_token = engine.model_config.kv_bytes_per_token(engine.cache.data.element_size())
    return statistics.median(times), per_token


def ucx_available() -> bool:
    try:
        import shared.transfer.ucx  # noqa: F401
    except ImportError:
        return False
    return True


def bandwidth_table(results: list[Result]) -> Table:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    table = Table(title=f"KV transfer, puller in another process ({platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} cores, load average {load}); memcpy: one thread, same size, "
                        "timed between the pulls")
    for name in ("transport", "transfer", "bytes", "median ms", "GB/s", "memcpy GB/s", "of memcpy"):
        table.add_column(name, justify="right")
    for r in results:
        table.add_row(r.variant, r.item, f"{r.nbytes:,}", f"{1000 * r.seconds:.2f}", f"{r.bytes_s / 1e9:.2f}",
                      f"{r.memcpy_bytes_s / 1e9:.2f}", f"{100 * r.bytes_s / r.memcpy_bytes_s:.0f}%")
    return table


def ttft_table(results: list[Result], ttft_s: float, tokens: int, source: str) -> Table:
    table = Table(title=f"KV of a {tokens}-token prompt against its TTFT ({1000 * ttft_s:.0f} ms, {source})")
    for name in ("transport", "transfer", "KV bytes", "transfer ms", "share of TTFT"):
        table.add_column(name, justify="right")
    for r in results:
        if r.item in (KV_ITEM, HEADS_ITEM):
            table.add_row(r.variant, r.item, f"{r.nbytes:,}", f"{1000 * r.seconds:.2f}",
                          f"{100 * r.seconds / ttft_s:.1f}%")
    return table




def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("transfer", help="KV transfer bandwidth per transport against memcpy and TTFT",
                              description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--transports", type=names_from(VARIANTS, "transport"), default=tuple(VARIANTS),
                   help=f"comma-separated: {', '.join(VARIANTS)} (default: all available)")
    p.add_argument("--sizes-mib", type=positive_ints, default=[1, 16, 64], help="default 1,16,64")
    p.add_argument("--prompt-tokens", type=positive_int, default=512, help="tokens of the typical prompt (512)")
    p.add_argument("--ttft-ms", type=float, help="TTFT of that prompt; default: measure its prefill with the engine")
    p.add_argument("--model", default="default", help="model for the TTFT measurement (default %(default)s)")
    p.add_argument("--threads", type=positive_int, help="torch threads for the TTFT measurement")
    p.add_argument("--repeat", type=positive_int, default=10, help="timed pulls per transfer (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed pulls first (default %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    console = Console() if sys.stdout.isatty() else Console(width=120)  # whole tables in files and pipes
    log = Console(stderr=True)
    if args.warmup < 0 or (args.ttft_ms is not None and args.ttft_ms <= 0):
        log.print("[red]error:[/red] --warmup must be >= 0 and --ttft-ms > 0")
        return 2
    per_token = DEFAULT_KV_BYTES_PER_TOKEN
    if args.ttft_ms is not None:
        ttft_s, source = args.ttft_ms / 1000, "given with --ttft-ms"
    else:
        log.log(f"measuring the prefill of {args.prompt_tokens} tokens with model {args.model}")
        try:
            ttft_s, per_token = measure_ttft(args.model, args.prompt_tokens, args.threads, 1, 3)
        except (ValueError, FileNotFoundError) as e:
            log.print(f"[red]error:[/red] {e}")
            return 2
        source = f"prefill step of {args.model}, median of 3"
    kv_bytes = per_token * args.prompt_tokens
    plan = items(args.sizes_mib, kv_bytes)
    results: list[Result] = []
    for key in args.transports:
        if VARIANTS[key].transport == "ucx" and not ucx_available():
            log.log(f"skipping {key}: ucxx is not installed")
            continue
        log.log(f"{VARIANTS[key].label}: pulling {', '.join(plan)}")
        results += bench_variant(key, plan, args.sizes_mib, kv_bytes, args.warmup, args.repeat)
    for key in args.transports:
        console.print(f"{key}: {VARIANTS[key].label}")
    console.print(bandwidth_table(results))
    console.print(ttft_table(results, ttft_s, args.prompt_tokens, source))
    return 0

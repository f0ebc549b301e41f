"""`distserve bench engine`: prefill and decode speed of the engine next to this machine's own limits.

The limits are measured in the same run with the same threads, on the engine's device: memory bandwidth
from a large tensor copy (read + write bytes) and GEMM FLOP/s from a large matmul (fp32 on a CPU, bf16
on a GPU, where --device cuda runs the fp32 and bf16 variants: the others are CPU formats). Decode is
memory-bound (its floor is the weight and KV bytes read per step over the bandwidth); prefill is
compute-bound (its ceiling is the GEMM rate). Every number is the median of timed runs after warm-up runs, through
`LLMEngine.step()`, so scheduling, sampling and detokenization are included as a server sees them.
Each variant's quality is its perplexity on a fixed text and how often its greedy token is fp32's
(shared/engine/perplexity.py).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from shared.argtypes import names_from, positive_int, positive_ints
from shared.engine.config import EngineConfig, Weights
from shared.engine.device import resolve_device
from shared.engine.engine import LLMEngine
from shared.engine.perplexity import Score, reference_tokens, score
from shared.engine.precision import cpu_kind, cpu_model
from shared.engine.quant import Fp16Linear, PackedBf16Linear
from shared.engine.sequence import SamplingParams

# float32 weights; fp16 (FBGEMM) or weight-only int8 linear layers, GGUF's q8_0 and q4_1 blocks in our
# kernel (shared/engine/quant.py); bfloat16 weights and KV, with the weights packed for oneDNN where the
# CPU allows (bf16) or not (bf16-plain)
VARIANTS = ("fp32", "fp16", "int8", "q8_0", "q4_1", "bf16", "bf16-plain")
WEIGHTS: dict[str, Weights] = {"fp32": "native", "fp16": "fp16", "int8": "int8", "q8_0": "q8_0", "q4_1": "q4_1",
                               "bf16": "native", "bf16-plain": "native"}


@dataclass(frozen=True)
class Machine:
    threads: int
    bandwidth_bytes_s: float  # read + write bytes of a large copy
    gemm_flop_s: float  # fp32 on a CPU, bf16 on a GPU
    device: str = "cpu"


@dataclass(frozen=True)
class PrefillResult:
    variant: str
    tokens: int
    seconds: float
    flops: float

    @property
    def tokens_s(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True)
class DecodeResult:
    variant: str
    batch: int
    context: int
    seconds: float  # per step
    bytes_read: float  # weights + KV of the batch
    steps: str = "eager"  # or "CUDA graphs", "compiled": how the decode steps ran

    @property
    def tokens_s(self) -> float:
        return self.batch / self.seconds


def median_time(fn: Callable[[], object], warmup: int, repeat: int) -> float:
    """Median seconds of fn, which must not return before its work is done (a GPU's: synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synchronized(fn: Callable[[], object], device: str) -> Callable[[], None]:
    def run() -> None:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def measure_machine(warmup: int, repeat: int, copy_mib: int, gemm_n: int, device: str = "cpu") -> Machine:
    src = torch.rand(copy_mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = median_time(synchronized(lambda: dst.copy_(src), device), warmup, repeat)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.rand(gemm_n, gemm_n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(gemm_n, gemm_n, device=device, dtype=dtype)
    gemm_s = median_time(synchronized(lambda: torch.mm(a, b, out=out), device), warmup, repeat)
    return Machine(torch.get_num_threads(), 2 * src.nbytes / copy_s, 2 * gemm_n**3 / gemm_s, device)


def decode_weight_bytes(engine: LLMEngine) -> int:
    """Bytes one decode step must read: every weight except the embedding table and RoPE tables, of
    which only a few rows are touched (a tied LM head is counted, through lm_head); packed weights
    (quant.py) at their packed size."""
    seen: set[int] = set()
    total = 0
    for name, module in engine.model.named_modules():
        if name in ("embed_tokens", "rotary"):
            continue
        if isinstance(module, (Fp16Linear, PackedBf16Linear)):
            total += module.weight_nbytes
            continue  # a plain copy kept for compiled graphs is the same weight
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def prefill_flops(engine: LLMEngine, n: int) -> float:
    """2 * (layer params) * tokens + the LM head for the one sampled row + causal attention."""
    c = engine.model_config
    layer_params = c.num_layers * (c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
                                   + 3 * c.hidden_size * c.intermediate_size)
    attention = c.num_layers * 2 * n * n * c.num_heads * c.head_dim  # QK^T and PV, half of each (causal)
    return 2 * layer_params * n + 2 * c.vocab_size * c.hidden_size + attention


def random_prompt(engine: LLMEngine, n: int, generator: torch.Generator) -> list[int]:
    return torch.randint(3, engine.model_config.vocab_size, (n,), generator=generator).tolist()


def bench_prefill(engine: LLMEngine, variant: str, n: int, warmup: int, repeat: int) -> PrefillResult:
    generator = torch.Generator().manual_seed(n)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    runs = iter(range(warmup + repeat))

    def run() -> None:  # one prompt, one step: prefill and its first token
        engine.add_request(f"prefill-{n}-{next(runs)}", random_prompt(engine, n, generator), params)
        engine.step()
        if engine.has_unfinished():
            raise RuntimeError("prefill did not finish in one step")

    return PrefillResult(variant, n, median_time(run, warmup, repeat), prefill_flops(engine, n))


def bench_decode(engine: LLMEngine, variant: str, batch: int, context: int, warmup: int, steps: int,
                 weight_bytes: int) -> DecodeResult:
    generator = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=warmup + steps + 2, temperature=0, ignore_eos=True)
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, random_prompt(engine, context, generator), params)
    while engine.stats().num_waiting:  # prefill everything first
        engine.step()
    if engine.stats().num_running != batch:
        raise RuntimeError(f"only {engine.stats().num_running} of {batch} sequences fit in one decode batch")
    seconds = median_time(engine.step, warmup, steps)
    mid_context = context + warmup + steps // 2
    kv_bytes = batch * mid_context * engine.model_config.kv_bytes_per_token(engine.cache.data.element_size())
    for rid in ids:
        engine.abort(rid)
    how = "CUDA graphs" if engine.runner.graphs is not None else "compiled" if engine.compiled else "eager"
    return DecodeResult(variant, batch, mid_context, seconds, weight_bytes + kv_bytes, how)


@dataclass(frozen=True)
class VariantResult:
    prefills: list[PrefillResult]
    decodes: list[DecodeResult]
    weight_bytes: int
    quality: Score | None  # on the reference text (shared/engine/perplexity.py)


def engine_for(args: argparse.Namespace, variant: str, max_batch: int) -> LLMEngine:
    return LLMEngine(EngineConfig(model=args.model, num_threads=args.threads, weights=WEIGHTS[variant],
                                  dtype="bfloat16" if variant.startswith("bf16") else "float32",
                                  pack_bf16=variant != "bf16-plain",
                                  max_num_seqs=max_batch, max_num_batched_tokens=max(args.prefill_lengths),
                                  kv_cache_memory_gib=args.kv_gib, compile=args.compile,
                                  paged_attention=not args.gather_attention, device=args.device, tp=args.tp))


def quality(engine: LLMEngine, tokens: int, console: Console) -> Score | None:
    text = reference_tokens(engine.tokenizer, tokens)
    if max(text) >= engine.model_config.vocab_size:  # a random model smaller than its tokenizer
        console.log(f"quality skipped: the model's vocabulary ({engine.model_config.vocab_size}) is smaller "
                    "than its tokenizer's")
        return None
    return score(engine.model, text, engine.runner.dtype)


def bench_variant(args: argparse.Namespace, variant: str, console: Console) -> VariantResult:
    max_batch = max(args.decode_batches)
    if args.compile:
        console.log(f"{variant}: compiling decode steps")
    engine = engine_for(args, variant, max_batch)
    try:
        return measure_variant(args, engine, variant, console)
    finally:
        engine.close()  # a tensor-parallel engine's other ranks


def measure_variant(args: argparse.Namespace, engine: LLMEngine, variant: str, console: Console) -> VariantResult:
    max_batch = max(args.decode_batches)
    tokens_needed = max(max(args.prefill_lengths), max_batch * (args.context + args.warmup + args.decode_steps + 3))
    capacity = engine.blocks.num_blocks * engine.config.block_size
    if capacity < tokens_needed + max_batch * engine.config.block_size:
        raise ValueError(f"--kv-gib {args.kv_gib} holds {capacity} tokens; this grid needs about {tokens_needed}")
    weight_bytes = decode_weight_bytes(engine)
    prefills = []
    for n in args.prefill_lengths:
        console.log(f"{variant}: prefill {n} tokens")
        prefills.append(bench_prefill(engine, variant, n, args.warmup, args.repeat))
    decodes = []
    for b in args.decode_batches:
        console.log(f"{variant}: decode batch {b}")
        decodes.append(bench_decode(engine, variant, b, args.context, args.warmup, args.decode_steps, weight_bytes))
        graphs = engine.runner.graphs
        if graphs is not None:  # the same steps eager, in the same run: what the graphs save
            engine.runner.graphs = None
            try:
                decodes.append(bench_decode(engine, variant, b, args.context, args.warmup, args.decode_steps,
                                            weight_bytes))
            finally:
                engine.runner.graphs = graphs
    scored = None
    if args.quality_tokens:
        console.log(f"{variant}: perplexity on {args.quality_tokens} tokens of the reference text")
        scored = quality(engine, args.quality_tokens, console)
    return VariantResult(prefills, decodes, weight_bytes, scored)


def machine_table(m: Machine, load_start: float) -> Table:
    load = f"{load_start:.2f} -> {os.getloadavg()[0]:.2f}"
    title = f"Machine: {cpu_model()} ({cpu_kind()}), {os.cpu_count()} cores, torch {torch.__version__}"
    if m.device == "cuda":
        title += f"; measured on {torch.cuda.get_device_name()}"
    table = Table(title=title)
    gemm = "bf16 GEMM" if m.device == "cuda" else "fp32 GEMM"
    for name in ("threads", "load (1 min) start -> end", "copy bandwidth (R+W)", gemm):
        table.add_column(name, justify="right")
    table.add_row(str(m.threads), load, f"{m.bandwidth_bytes_s / 1e9:.3g} GB/s", f"{m.gemm_flop_s / 1e9:.3g} GFLOP/s")
    return table


def prefill_table(results: list[PrefillResult], m: Machine) -> Table:
    table = Table(title="Prefill: one prompt per step (FLOPs: 2 x params x tokens + causal attention)")
    for name in ("variant", "tokens", "ms", "tokens/s", "GFLOP/s", "of GEMM"):
        table.add_column(name, justify="right")
    for r in results:
        rate = r.flops / r.seconds
        table.add_row(r.variant, str(r.tokens), f"{1000 * r.seconds:.1f}", f"{r.tokens_s:.0f}",
                      f"{rate / 1e9:.3g}", f"{100 * rate / m.gemm_flop_s:.0f}%")
    return table


def decode_table(results: list[DecodeResult], m: Machine, weight_bytes: dict[str, int]) -> Table:
    table = Table(title="Decode: one token per sequence per step (floor: weight + KV bytes read / bandwidth)")
    for name in ("variant", "steps", "batch", "context", "weights MB", "ms/step", "tokens/s", "floor ms",
                 "step/floor", "vs batch 1"):
        table.add_column(name, justify="right")
    for r in results:
        floor = r.bytes_read / m.bandwidth_bytes_s
        base = next((b for b in results if (b.variant, b.steps, b.batch) == (r.variant, r.steps, 1)), None)
        versus = f"{r.tokens_s / base.tokens_s:.1f}x" if base else "-"
        table.add_row(r.variant, r.steps, str(r.batch), str(r.context), f"{weight_bytes[r.variant] / 1e6:.3g}",
                      f"{1000 * r.seconds:.1f}", f"{r.tokens_s:.1f}", f"{1000 * floor:.3g}",
                      f"{r.seconds / floor:.2f}x", versus)
    return table


def quality_table(scores: dict[str, Score], reference: Score, tokens: int) -> Table:
    table = Table(title=f"Quality: {tokens} tokens of the reference text (HumanEval), scored as decode rows")
    for name in ("variant", "perplexity", "vs fp32", "same top-1 token as fp32"):
        table.add_column(name, justify="right")
    for variant, s in scores.items():
        table.add_row(variant, f"{s.perplexity:.4f}", f"{100 * (s.perplexity / reference.perplexity - 1):+.2f}%",
                      f"{100 * s.agreement(reference):.1f}%")
    return table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("engine", help="engine prefill and decode speed against this machine's limits",
                              description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", default="default", help="as for `distserve generate` (default %(default)s)")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: all cores)")
    p.add_argument("--variants", type=names_from(VARIANTS, "variant"), default=("fp32",),
                   help="comma-separated, run one after the other: " + ", ".join(VARIANTS) + "; default fp32")
    p.add_argument("--int8", dest="variants", action="store_const", const=("int8",), help="same as --variants int8")
    p.add_argument("--repeat", type=positive_int, default=5, help="timed runs per measurement (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default %(default)s)")
    p.add_argument("--decode-steps", type=positive_int, default=16, help="timed steps per decode batch (default 16)")
    p.add_argument("--prefill-lengths", type=positive_ints, default=[128, 512, 1024], help="default 128,512,1024")
    p.add_argument("--decode-batches", type=positive_ints, default=[1, 8, 32], help="default 1,8,32")
    p.add_argument("--context", type=positive_int, default=128, help="prompt tokens per decode sequence (default 128)")
    p.add_argument("--compile", action="store_true",
                   help="decode steps as one torch.compile graph (EngineConfig.compile; compiles at start)")
    p.add_argument("--gather-attention", action="store_true",
                   help="decode attention by gathering KV + SDPA, not the paged kernel (EngineConfig.paged_attention)")
    p.add_argument("--kv-gib", type=float, default=1.0, help="KV cache size (default %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the engine and the limits run (default %(default)s)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel ranks of the engine (default 1; "
                   "the weights column and the floor count rank 0's share)")
    p.add_argument("--copy-mib", type=positive_int, default=256, help="bandwidth test buffer (default 256)")
    p.add_argument("--gemm-n", type=positive_int, default=2048, help="GEMM test size n x n x n (default 2048)")
    p.add_argument("--quality-tokens", type=int, default=512, help="score each variant's perplexity and top-1 "
                   "agreement with fp32 on this many tokens of a fixed text; 0: skip (default %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    console = Console() if sys.stdout.isatty() else Console(width=120)  # whole tables in files and pipes
    log = Console(stderr=True)
    if args.warmup < 0 or args.quality_tokens < 0 or args.quality_tokens == 1:
        log.print("[red]error:[/red] --warmup must be >= 0, --quality-tokens 0 or >= 2")
        return 2
    if args.tp > 1 and args.quality_tokens:  # it scores rank 0's model alone
        log.print("[red]error:[/red] --tp above 1 needs --quality-tokens 0")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    try:
        first = measure_machine(args.warmup, args.repeat, args.copy_mib, args.gemm_n, resolve_device(args.device))
    except ValueError as e:  # cuda asked for, none here
        log.print(f"[red]error:[/red] {e}")
        return 2
    prefills: list[PrefillResult] = []
    decodes: list[DecodeResult] = []
    weight_bytes: dict[str, int] = {}
    scores: dict[str, Score] = {}
    for variant in args.variants:
        try:
            result = bench_variant(args, variant, log)
        except (ValueError, FileNotFoundError) as e:
            log.print(f"[red]error:[/red] {e}")
            return 2
        prefills += result.prefills
        decodes += result.decodes
        weight_bytes[variant] = result.weight_bytes
        if result.quality:
            scores[variant] = result.quality
        del result
        gc.collect()  # the previous variant's weights and KV cache go before the next loads
    if scores and "fp32" not in scores:
        reference = quality(engine_for(args, "fp32", 1), args.quality_tokens, log)
        scores = {"fp32": reference, **scores} if reference else {}
    # Limits are measured before and after, and the better kept: a neighbour's burst lowers one of them.
    last = measure_machine(args.warmup, args.repeat, args.copy_mib, args.gemm_n, first.device)
    machine = Machine(first.threads, max(first.bandwidth_bytes_s, last.bandwidth_bytes_s),
                      max(first.gemm_flop_s, last.gemm_flop_s), first.device)
    console.print(f"model: {args.model}" + (f", TP{args.tp}" if args.tp > 1 else "")
                  + (", decode steps compiled" if args.compile else "")
                  + (", decode attention by gather + SDPA" if args.gather_attention else ""))
    console.print(machine_table(machine, load_start))
    console.print(prefill_table(prefills, machine))
    console.print(decode_table(decodes, machine, weight_bytes))
    if scores:
        console.print(quality_table(scores, scores["fp32"], args.quality_tokens))
    return 0

"""Decode steps replayed from CUDA graphs (`EngineConfig.cuda_graphs`; on a GPU, at tp 1).

Why: on a GPU a decode step launches some twenty kernels per layer, each a few microseconds of work and
as many of Python and launch; at small batches the launches cost about what reading the weights does. A
CUDA graph replays a whole step's kernels from one launch (vLLM, nano-vllm and gpt-fast do the same).

A graph has fixed shapes and fixed addresses, so one is captured per batch-size bucket at engine start,
all reading one set of static input buffers: a step's batch is copied in, padded to its bucket, and the
bucket's graph replayed. Padding rows decode a dummy token into a scratch block that no request owns
(the runner's cache has one block more than it hands out), with one position of context. Block tables
are padded to the most blocks a sequence can have; the attention kernel reads only the blocks within
each row's context. A step the graphs do not cover (a prefill, a batch beyond the largest bucket) runs
eager.

On the CPU the same padded steps run eagerly (`capture=False`), which is how the tests check that
padding leaves the real rows' logits and KV exactly as an unpadded step gives them. The capture itself
runs only on a GPU (deploy/gpu/check.sh); no GPU has been lent to this project's sessions yet.
"""

from __future__ import annotations

import logging
import time

import torch

from shared.engine.kv_cache import KVCache
from shared.engine.model import ForwardBatch, Transformer

log = logging.getLogger(__name__)

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def buckets(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for: 1, 2, 4, 8, then every 16 up to max_batch (always included)."""
    sizes = [size for size in (1, 2, 4, 8) if size < max_batch]
    sizes += list(range(16, max_batch, 16))
    return [*sizes, max_batch]


class DecodeGraphs:
    def __init__(self, model: Transformer, cache: KVCache, scratch_block: int, max_batch: int, max_blocks: int,
                 capture: bool = True) -> None:
        self.model = model
        self.cache = cache
        self.scratch_block = scratch_block
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.buckets = buckets(max_batch)
        device = cache.data.device
        # The static inputs every graph reads, [max_batch] (tables [max_batch, max_blocks]), padding to start with.
        self.token_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slot_blocks = torch.full((max_batch,), scratch_block, dtype=torch.long, device=device)
        self.slot_offsets = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.tables = torch.full((max_batch, max_blocks), scratch_block, dtype=torch.long, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.long, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}  # each graph's output buffer
        if capture:
            self._capture()

    def covers(self, batch: ForwardBatch) -> bool:
        return (not batch.prefill_spans and 0 < batch.num_decode <= self.max_batch
                and batch.decode_block_tables.shape[1] <= self.max_blocks)

    @torch.inference_mode()
    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [num_sequences, vocab], as Transformer.forward gives them, of a batch that `covers` takes."""
        n = batch.num_decode
        size = next(size for size in self.buckets if size >= n)
        # The batch's rows (host tensors: one copy each), then padding for the rest of the bucket: a row a
        # larger batch used before must not write into a block that is no longer its own. (Its table may stay:
        # reading one position of any block is harmless.)
        self.token_ids[:n].copy_(batch.token_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.slot_blocks[:n].copy_(batch.slot_blocks, non_blocking=True)
        self.slot_offsets[:n].copy_(batch.slot_offsets, non_blocking=True)
        self.tables[:n, :batch.decode_block_tables.shape[1]].copy_(batch.decode_block_tables, non_blocking=True)
        self.context_lens[:n].copy_(batch.decode_context_lens, non_blocking=True)
        self.token_ids[n:size] = 0
        self.positions[n:size] = 0
        self.slot_blocks[n:size] = self.scratch_block
        self.slot_offsets[n:size] = 0
        self.context_lens[n:size] = 1
        logits = self._run(size)[:n]
        return logits if len(batch.logits_indices) == n else logits[batch.logits_indices.to(logits.device)]

    def _inputs(self, size: int) -> Inputs:
        return (self.token_ids[:size], self.positions[:size], self.slot_blocks[:size], self.slot_offsets[:size],
                self.tables[:size], self.context_lens[:size])

    def _run(self, size: int) -> torch.Tensor:
        graph = self._graphs.get(size)
        if graph is None:
            return self.model.decode(*self._inputs(size), self.cache)
        graph.replay()
        return self._logits[size]

    @torch.inference_mode()
    def _capture(self) -> None:
        """One graph per bucket, largest first, all in one memory pool (a step runs one at a time). The inputs
        are padding throughout: capturing writes only into the scratch block."""
        started = time.perf_counter()
        pool = None
        for size in reversed(self.buckets):
            inputs = self._inputs(size)
            self.model.decode(*inputs, self.cache)  # outside the graph: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[size] = self.model.decode(*inputs, self.cache)
            pool = graph.pool()
            self._graphs[size] = graph
        torch.cuda.synchronize()
        log.info("CUDA graphs for decode batches %s captured in %.1f s", self.buckets, time.perf_counter() - started)

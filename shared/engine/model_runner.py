"""The model runner: owns the model and its KV cache; turns a scheduled batch into sampled tokens.

Three steps per engine step, each its own method so that the engine can run `forward` without its
lock (see shared/engine/engine.py): `prepare` (flat input tensors from the scheduled sequences),
`forward` (on a GPU the CUDA graphs, on a CPU the compiled decode graph, where they cover the batch; else
the eager model) and `sample`.
It also reads and writes whole requests' KV for the hand-off between engines (`kv_views`, staging).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from shared.engine.api import HeadShare
from shared.engine.compiled import CompiledDecode
from shared.engine.config import EngineConfig, ModelConfig
from shared.engine.cuda_graphs import DecodeGraphs
from shared.engine.device import rank_device, resolve_device
from shared.engine.kv_cache import KVCache
from shared.engine.loader import load_model
from shared.engine.model import ForwardBatch, PrefillSpan, Transformer
from shared.engine.precision import cpu_kind
from shared.engine.quant import can_pack_bf16, convert_linears_, pack_bf16_linears_
from shared.engine.sampler import sample
from shared.engine.scheduler import ScheduledBatch
from shared.engine.sequence import Sequence
from shared.engine.tensor_parallel import Shard, shard_config, shard_model_

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelRunner:
    """One rank's model and cache. At tp > 1 (shared/engine/tp_group.py) each rank has its shard of the
    model and its heads of every KV block; every rank has the same blocks, handed out by rank 0."""

    def __init__(self, config: EngineConfig, shard: Shard | None = None,
                 all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        shard = shard or Shard()
        self.shard = shard
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.dtype = DTYPES[config.dtype]
        self.device = rank_device(resolve_device(config.device), shard.rank)
        on_cpu = self.device.type == "cpu"
        chosen = f"chosen for this {cpu_kind() + ' CPU' if on_cpu else 'GPU'}"
        log.info("%s engine on %s: dtype=%s, weights=%s (%s)", config.role, self.device, config.dtype,
                 config.weights, chosen if config.precision_chosen else "as configured")
        self.model: Transformer = load_model(config.model, dtype=self.dtype, seed=config.seed, device=self.device)
        self.model_config: ModelConfig = self.model.config  # the whole model's shape, whatever this rank holds
        if shard.world > 1:
            assert all_reduce is not None, "a rank of a tensor-parallel instance needs its all-reduce"
            shard_model_(self.model, shard, all_reduce)  # before converting weights: they pack plain Linears
        if config.weights != "native":
            convert_linears_(self.model, config.weights)
        elif on_cpu and self.dtype == torch.bfloat16 and config.pack_bf16 and can_pack_bf16():
            pack_bf16_linears_(self.model, keep_plain=config.compile)  # compiled graphs need plain weights
        self.model.to(self.device)

        # The KV budget is the instance's: sized by the whole model's blocks, so every rank has as many.
        block_bytes = KVCache.bytes_per_block(self.model_config, config.block_size, self.dtype)
        self.num_blocks = int(config.kv_cache_memory_gib * 2**30) // block_bytes  # what the engine hands out
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_memory_gib={config.kv_cache_memory_gib} holds no {block_bytes}-byte block")
        graphs = not on_cpu and config.cuda_graphs and shard.world == 1 and config.role != "prefill"
        # With CUDA graphs, one block more: the scratch block their padding rows write into.
        self.cache = KVCache(shard_config(self.model_config, shard), self.num_blocks + graphs, config.block_size,
                             self.dtype, self.device)
        if config.paged_attention:
            try:
                self.model.use_paged_attention(self.device)
            except (RuntimeError, OSError) as e:  # no C++ compiler here: the generic path still works
                log.warning("paged decode attention unavailable, gathering KV instead: %s", e)
        if not on_cpu:
            self.model.use_packed_prefill()
            self.model.use_triton_layer_ops()
        if on_cpu:  # the C++ ops are CPU code
            try:
                self.model.use_native_layer_ops()
            except (RuntimeError, OSError) as e:
                log.warning("C++ RMSNorm and RoPE unavailable, using torch's: %s", e)
        self.compiled: CompiledDecode | None = None
        if config.compile and config.role != "prefill":  # a prefill engine never runs a decode-only step
            self.compiled = CompiledDecode(self.model, self.cache)
            self.compiled.warm_up()  # before any block is handed out: it writes to block 0
        self.graphs: DecodeGraphs | None = None
        if graphs:
            positions = self.model_config.max_position_embeddings
            max_len = min(config.max_model_len or positions, positions)
            self.graphs = DecodeGraphs(self.model, self.cache, scratch_block=self.num_blocks,
                                       max_batch=config.max_num_seqs, max_blocks=-(-max_len // config.block_size))
        self.generator = torch.Generator().manual_seed(torch.seed())

    # -- one step ------------------------------------------------------------------------------------

    def prepare(self, scheduled: ScheduledBatch) -> tuple[ForwardBatch, list[Sequence]]:
        """The flat batch (decode tokens first, then prefill spans) and the sequences that get a new token."""
        decodes = [(s, n) for s, n in scheduled if n == 1]
        prefills = [(s, n) for s, n in scheduled if n > 1]
        bs = self.config.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        sampling: list[Sequence] = []
        logits_rows: list[int] = []
        spans: list[PrefillSpan] = []
        for seq, n in decodes + prefills:
            start = seq.num_computed_tokens
            if n > 1:
                spans.append(PrefillSpan(len(token_ids), n, start, torch.tensor(seq.block_table)))
            token_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            if start + n == seq.num_tokens:  # all known tokens are in: sample the next one
                sampling.append(seq)
                logits_rows.append(len(token_ids) - 1)

        pos = torch.tensor(positions)
        tables = [torch.tensor(s.block_table) for s, _ in decodes + prefills]
        counts = torch.tensor([n for _, n in decodes + prefills])
        row_table = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)  # [seqs, max_blocks]
        seq_of_token = torch.repeat_interleave(torch.arange(len(tables)), counts)
        slot_blocks = row_table[seq_of_token, pos // bs]
        decode_tables = row_table[: len(decodes)]
        if decodes:
            decode_tables = decode_tables[:, : max(len(s.block_table) for s, _ in decodes)]
        batch = ForwardBatch(
            token_ids=torch.tensor(token_ids), positions=pos, slot_blocks=slot_blocks, slot_offsets=pos % bs,
            num_decode=len(decodes), decode_block_tables=decode_tables,
            decode_context_lens=torch.tensor([s.num_computed_tokens + 1 for s, _ in decodes], dtype=torch.long),
            prefill_spans=spans, logits_indices=torch.tensor(logits_rows, dtype=torch.long),
        )
        return batch, sampling

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [sequences to sample, vocab]; writes the batch's K/V into the cache."""
        if self.graphs is not None and self.graphs.covers(batch):  # they copy the batch into their own buffers
            return self.graphs(batch)
        batch = batch.to(self.device)
        if self.compiled is not None and self.compiled.covers(batch):
            return self.compiled(batch)
        return self.model(batch, self.cache)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        return sample(logits, seqs, self.generator)

    # -- KV of whole requests, for the hand-off ----------------------------------------------------------

    def kv_views(self, block_ids: list[int]) -> list[torch.Tensor]:
        """The blocks' bytes as contiguous views, in token order (one per run of consecutive ids)."""
        return self.cache.views(block_ids)

    def kv_heads(self, dtype: torch.dtype) -> HeadShare:
        """The KV heads this rank's blocks hold (all of them at tp 1), as KV of `dtype` carries them."""
        c = self.model_config
        heads = self.shard.part(c.num_kv_heads)
        return HeadShare(heads.start, heads.stop, c.num_kv_heads, c.head_dim * dtype.itemsize)

    def kv_staging(self, num_blocks: int, dtype: torch.dtype) -> torch.Tensor:
        """A host buffer for imported KV of this rank's heads in `dtype` (the layout the hand-off moves),
        converted into the blocks by `commit_staging`."""
        c = self.model_config
        heads = len(self.shard.part(c.num_kv_heads))
        return torch.empty(num_blocks, c.num_layers, 2, self.config.block_size, heads, c.head_dim, dtype=dtype)

    def commit_staging(self, staging: torch.Tensor, block_ids: list[int]) -> None:
        start = 0
        for view in self.cache.views(block_ids):  # copy_ casts straight into the blocks: no intermediate copy
            view.copy_(staging[start:start + len(view)])
            start += len(view)

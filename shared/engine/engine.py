"""LLMEngine: the engine that computes the model, with torch (docs/engine-api.md).

Everything but the compute is `EngineCore` (shared/engine/core.py): requests, scheduling, the step's
bookkeeping, the KV hand-off. Here: the model runner prepares, runs and samples each step
(`ModelRunner`), and the KV cache's tensors are what the hand-off moves. KV imported in another dtype
than this engine's goes to a staging buffer and is converted into the blocks at commit.

At tp > 1 this engine is rank 0 of the instance (shared/engine/tp_group.py): it schedules and samples,
every rank computes its shard of each step, and each rank moves its own heads of the KV the hand-off
moves: rank 0 through its worker's transport, the others through theirs (shared/engine/tp_handoff.py).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from shared.engine.api import KVExport, KVImport, KVView
from shared.engine.config import EngineConfig
from shared.engine.core import EngineCore
from shared.engine.device import on_device
from shared.engine.kv_cache import KVCache
from shared.engine.model import ForwardBatch
from shared.engine.model_runner import DTYPES, ModelRunner
from shared.engine.scheduler import ScheduledBatch
from shared.engine.sequence import Sequence
from shared.model_files import model_display_name, tokenizer_source
from shared.protocol import KVHandle, KVMeta
from shared.tokenizer import load_tokenizer

if TYPE_CHECKING:  # imported when tp > 1: it starts processes and loads torch.distributed
    from shared.engine.tp_group import TensorParallel


class LLMEngine(EngineCore):
    def __init__(self, config: EngineConfig) -> None:
        config = on_device(config)  # a concrete device, and on a GPU a GPU's precision
        if config.pp > 1:
            raise ValueError(f"pp={config.pp}: the torch engine runs one pipeline stage (the emulated engine "
                             "models more)")
        self.tp: TensorParallel | None = None
        if config.tp > 1:
            from shared.engine.tp_group import TensorParallel

            self.tp = TensorParallel(config)
            self.runner = self.tp.runner
        else:
            self.runner = ModelRunner(config)
        self.model, self.model_config, self.cache = self.runner.model, self.runner.model_config, self.runner.cache
        self.compiled = self.runner.compiled
        positions = self.model_config.max_position_embeddings
        super().__init__(config, load_tokenizer(tokenizer_source(config.model)),
                         model_display_name(config.model), min(config.max_model_len or positions, positions),
                         self.model_config.vocab_size, self.runner.num_blocks)

    @property
    def label(self) -> str:
        return f"torch-{self.config.device}"

    def _prepare(self, scheduled: ScheduledBatch) -> tuple[ForwardBatch, list[Sequence]]:
        return self.runner.prepare(scheduled)

    def _compute(self, work: ForwardBatch) -> torch.Tensor:
        return self.tp.forward(work) if self.tp is not None else self.runner.forward(work)

    def _sample(self, computed: Any, sampled: list[Sequence]) -> list[int]:
        return self.runner.sample(computed, sampled)

    # -- the KV cache's bytes, for the hand-off --------------------------------------------------------

    @property
    def block_nbytes(self) -> int:
        """A block of the whole model (every KV head), as the hand-off moves it at any tp."""
        return KVCache.bytes_per_block(self.model_config, self.config.block_size, self.cache.data.dtype)

    @property
    def kv_dtype(self) -> str:
        return self.config.dtype

    def kv_views(self, block_ids: list[int]) -> list[KVView]:
        # This rank's heads (every head at tp 1); on a GPU a copy in host memory, which the transports move
        # (UCX's CUDA transports are not used yet).
        views = self.runner.kv_views(block_ids)
        return list(views) if self.runner.device.type == "cpu" else [view.cpu() for view in views]

    def kv_export(self, request_id: str) -> KVExport:
        """At tp > 1 the views are rank 0's heads; the other ranks offer theirs, on their own transports."""
        with self.lock:
            export = super().kv_export(request_id)
            if self.tp is None:
                return export
            addresses = self.tp.offer(request_id, self.scheduler.held[request_id].block_table)
            return KVExport(export.meta.model_copy(update={"shard_heads": self.tp.head_counts}), export.views,
                            addresses)

    def kv_import_ranks(self, kv: KVHandle, timeout: float) -> Future[int] | None:
        return self.tp.pull(kv, timeout) if self.tp is not None else None

    def _kv_dropped(self, request_id: str) -> None:
        if self.tp is not None:  # the other ranks withdraw its offer, or drop its pulled heads
            self.tp.forget(request_id)

    def close(self) -> None:
        if self.tp is not None:
            self.tp.close()

    @property
    def staging(self) -> dict[str, torch.Tensor]:
        """Imported KV in another dtype than the engine's, waiting for its commit to convert it."""
        return {rid: seq.kv_staging for rid, seq in self.scheduler.importing.items() if seq.kv_staging is not None}

    def _check_import(self, meta: KVMeta) -> None:
        source = DTYPES.get(meta.dtype)
        if source is None:
            raise ValueError(f"KV dtype {meta.dtype!r} is not one of {', '.join(DTYPES)}")
        block_numel = self.block_nbytes // self.cache.data.element_size()
        if meta.block_size != self.config.block_size or meta.block_nbytes != block_numel * source.itemsize:
            raise ValueError("KV layout mismatch between prefill and decode (model or block size differ)")

    def _import_target(self, seq: Sequence, meta: KVMeta) -> KVImport:
        """This rank's heads (every head at tp 1): straight into the blocks where they are host memory of the
        same dtype, else into a staging buffer that the commit converts."""
        source = DTYPES[meta.dtype]
        heads = self.runner.kv_heads(source)
        if source == self.cache.data.dtype and self.tp is None and self.runner.device.type == "cpu":
            return KVImport(self.kv_views(seq.block_table), heads)
        seq.kv_staging = self.runner.kv_staging(meta.num_blocks, source)
        return KVImport([seq.kv_staging], heads)

    def _commit_staging(self, seq: Sequence) -> None:
        assert seq.kv_staging is not None
        if self.tp is not None:
            self.tp.import_later(seq.request_id, seq.block_table, seq.kv_staging)
        else:
            self.runner.commit_staging(seq.kv_staging, seq.block_table)

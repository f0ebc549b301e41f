"""Decode-only steps as one compiled graph (`EngineConfig.compile`): torch.compile with inductor.

Why: a decode step at batch 1 reads every weight once and does little else, but in eager mode it is
some 600 small ops, each a trip through Python and the dispatcher. Inductor fuses the norms, RoPE,
residuals and masks into a few C++ loops around the GEMMs, and its C++ wrapper (`cpp_wrapper`) calls
them without Python in between. Prefill and mixed steps stay eager: their GEMMs are long enough.

Two graphs, both compiled at engine start so that no request pays for them (12-15 s with a warm
inductor cache, 1.5 minutes cold, on 2 cores: hence opt-in): batch 1, and batch >= 2 with the batch
dynamic. The number of KV blocks per sequence is dynamic in both. A step the graphs do not cover
(a single block of context) runs eager, and so would one that needs a new graph after warm-up:
serving never stops to compile.
"""

from __future__ import annotations

import logging

import torch

from shared.engine.kv_cache import KVCache
from shared.engine.model import ForwardBatch, Transformer
from shared.engine.quant import make_traceable_

log = logging.getLogger(__name__)

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class CompiledDecode:
    def __init__(self, model: Transformer, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        make_traceable_(model)
        self.num_compiled = 0  # steps run by a compiled graph
        self.num_eager = 0  # steps `covers` took that no compiled graph fitted
        # size_asserts: inductor checks every extern kernel's output shape at run time; ours are fixed.
        self._decode = torch.compile(model.decode, fullgraph=True,
                                     options={"cpp_wrapper": True, "size_asserts": False})

    @staticmethod
    def covers(batch: ForwardBatch) -> bool:
        tables = batch.decode_block_tables
        # Contiguous tables, as at warm-up: the graphs run without checking their guards (see __call__).
        return not batch.prefill_spans and tables.shape[1] >= 2 and tables.is_contiguous()

    @torch.inference_mode()
    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [num_sequences, vocab], as Transformer.forward gives them, of a batch that `covers` takes."""
        inputs = (batch.token_ids, batch.positions, batch.slot_blocks, batch.slot_offsets, batch.decode_block_tables,
                  batch.decode_context_lens)
        try:
            # Only the guards that told the warm-up graphs apart are checked (batch 1 or more): the rest hold
            # for every batch the engine builds, and checking them all costs 0.5 ms a step.
            with torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True):
                logits = self._decode(*inputs, self.cache)
            self.num_compiled += 1
        except RuntimeError as e:
            if "fail_on_recompile" not in str(e):
                raise
            if not self.num_eager:
                log.warning("a decode step needs a graph not compiled at start; running such steps eager: %s", e)
            self.num_eager += 1
            logits = self.model.decode(*inputs, self.cache)
        return logits if len(batch.logits_indices) == len(logits) else logits[batch.logits_indices]

    def warm_up(self) -> None:
        """Compile both graphs. Writes K/V into block 0: call it before any block is handed out."""
        for batch, num_blocks in ((1, 2), (3, 5)):  # distinct sizes, or dynamo would tie batch and blocks
            # Made outside inference mode, as the engine's are: guards check for it.
            inputs = self._dummy_inputs(batch, num_blocks)
            if batch > 1:
                for t in inputs:
                    torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(inputs[4], 1)  # blocks per sequence
            with torch.inference_mode():
                self._decode(*inputs, self.cache)

    def _dummy_inputs(self, batch: int, num_blocks: int) -> Inputs:
        # Six distinct tensors: guards check that inputs do not alias each other.
        context = torch.full((batch,), self.cache.block_size + 1)
        tables = torch.zeros(batch, num_blocks, dtype=torch.long)
        return context * 0, context - 1, context * 0, context - 1 - self.cache.block_size, tables, context

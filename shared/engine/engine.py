"""LLMEngine: the scheduler, the model and the KV cache behind one small API (docs/engine-api.md).

Thread safety: every public method takes the engine's lock, so a worker may run `step()` in its own
thread while its event loop adds, aborts, exports and imports requests. `step()` holds the lock only
to schedule and to process outputs, not during the forward pass: a KV import can reserve blocks and
join the batch, and a release can free blocks, while the model computes. The one call that would
touch the forward's own blocks, aborting a request in the running batch, waits for the step's end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict

from shared.engine.compiled import CompiledDecode
from shared.engine.config import EngineConfig, ModelConfig
from shared.engine.kv_cache import BlockManager, KVCache
from shared.engine.loader import load_model
from shared.engine.model import ForwardBatch, PrefillSpan
from shared.engine.model_files import model_display_name
from shared.engine.quant import can_pack_bf16, convert_linears_, pack_bf16_linears_
from shared.engine.sampler import sample
from shared.engine.scheduler import ScheduledBatch, Scheduler
from shared.engine.sequence import SamplingParams, Sequence, Status
from shared.engine.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

STEP_RECORDS = 4096  # steps kept for take_step_records (about 7 minutes of busy steps)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StepOutput:
    request_id: str
    token_id: int
    text: str  # new text since the previous output of this request
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    num_held: int
    free_blocks: int
    total_blocks: int
    queued_prompt_tokens: int


class KVMeta(BaseModel):
    """What a decode engine needs, besides the KV bytes, to continue a request exactly."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    num_kv_tokens: int
    num_blocks: int
    block_size: int
    block_nbytes: int
    output_text: str  # text generated so far, and how much of it was already streamed
    num_emitted_chars: int
    dtype: str = "float32"  # of the exported KV; an importer in another dtype converts it (EngineConfig.dtype)

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_nbytes


@dataclass(frozen=True)
class StepRecord:
    """One engine step as the latency model sees it (services/planner/latency.py), timed whole."""

    ended: float  # wall-clock time the step ended
    seconds: float  # scheduling, forward pass, sampling and outputs: what the profiler times
    prefill_lengths: tuple[int, ...]  # tokens computed for each prefilling sequence
    decode_batch: int  # sequences decoding one token
    decode_context: int  # their context lengths summed (positions attended, the new one included)


@dataclass(frozen=True)
class KVExport:
    meta: KVMeta
    views: list[torch.Tensor]  # contiguous, in token order; together meta.nbytes bytes

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.views)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        dtype = DTYPES[config.dtype]
        self.model = load_model(config.model, dtype=dtype, seed=config.seed)
        if config.weights != "native":
            convert_linears_(self.model, config.weights)
        elif dtype == torch.bfloat16 and config.pack_bf16 and can_pack_bf16():
            pack_bf16_linears_(self.model, keep_plain=config.compile)  # compiled graphs need plain weights
        self.model_config: ModelConfig = self.model.config
        self.tokenizer: Tokenizer = load_tokenizer("default" if config.model.startswith("random:") else config.model)
        self.model_name = model_display_name(config.model)
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)

        block_bytes = KVCache.bytes_per_block(self.model_config, config.block_size, dtype)
        num_blocks = int(config.kv_cache_memory_gib * 2**30) // block_bytes
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_gib={config.kv_cache_memory_gib} holds no {block_bytes}-byte block")
        self.cache = KVCache(self.model_config, num_blocks, config.block_size, dtype)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.blocks)
        if config.paged_attention:
            try:
                self.model.use_paged_attention()
            except (RuntimeError, OSError) as e:  # no C++ compiler here: the generic path still works
                log.warning("paged decode attention unavailable, gathering KV instead: %s", e)
        self.compiled: CompiledDecode | None = None
        if config.compile and config.role != "prefill":  # a prefill engine never runs a decode-only step
            self.compiled = CompiledDecode(self.model, self.cache)
            self.compiled.warm_up()  # before any block is handed out: it writes to block 0
        self.held: dict[str, Sequence] = {}
        self.importing: dict[str, Sequence] = {}
        # KV arriving in another dtype (a bfloat16 prefill for a float32 decode): received here, converted
        # into the request's blocks at commit
        self.staging: dict[str, torch.Tensor] = {}
        self.sequences: dict[str, Sequence] = {}
        self.generator = torch.Generator().manual_seed(torch.seed())
        self.lock = threading.RLock()
        self._stepping = threading.Lock()  # one forward pass at a time
        self._in_flight: frozenset[str] = frozenset()  # requests in the forward pass now
        self._abort_after_step: set[str] = set()  # aborted while in flight: freed when the step ends
        # The latest steps, for fitting a latency profile to the steps served (take_step_records)
        self.step_records: deque[StepRecord] = deque(maxlen=STEP_RECORDS)

    # -- requests -------------------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError with a user-facing message if this request can never be served."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty")
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
                             f"context length of {self.max_model_len} tokens")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if self.blocks.blocks_needed(n + 1) > self.blocks.num_blocks:
            raise ValueError(f"prompt ({n} tokens) does not fit in this worker's KV cache")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.validate(prompt_token_ids, params)
        with self.lock:
            if request_id in self.sequences:
                raise ValueError(f"request id {request_id!r} is already in use")
            seq = Sequence(request_id, prompt_token_ids, params, self.tokenizer)
            self.sequences[request_id] = seq
            self.scheduler.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        with self.lock:
            seq = self.sequences.get(request_id)
            if seq is None:
                return False
            if request_id in self._in_flight:  # its blocks are being written: free them after the step
                self._abort_after_step.add(request_id)
                return True
            if seq.status is Status.WAITING:
                self.scheduler.waiting.remove(seq)
            elif seq.status is Status.RUNNING:
                self.scheduler.running.remove(seq)
            self._finish(seq)
            return True

    def release(self, request_id: str) -> None:
        """Prefill role: the decode side has the KV now; free it."""
        with self.lock:
            seq = self.held.get(request_id)
            if seq is None:
                raise KeyError(f"no held request {request_id!r}")
            self._finish(seq)

    def has_unfinished(self) -> bool:
        with self.lock:
            return bool(self.scheduler.waiting or self.scheduler.running)

    def stats(self) -> EngineStats:
        with self.lock:
            return EngineStats(
                num_waiting=len(self.scheduler.waiting), num_running=len(self.scheduler.running),
                num_held=len(self.held), free_blocks=self.blocks.num_free, total_blocks=self.blocks.num_blocks,
                queued_prompt_tokens=self.scheduler.queued_prompt_tokens(),
            )

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        with self._stepping:
            started = time.perf_counter()
            with self.lock:
                scheduled = self.scheduler.schedule()
                if not scheduled:
                    return []
                batch, sampling = self._build_batch(scheduled)
                self._in_flight = frozenset(seq.request_id for seq, _ in scheduled)
            try:
                logits = self._forward(batch)  # without the lock: see the module docstring
            except BaseException:
                with self.lock:
                    self._in_flight = frozenset()
                raise
            with self.lock:
                self._in_flight = frozenset()
                for seq, n in scheduled:
                    seq.num_computed_tokens += n
                tokens = sample(logits, sampling, self.generator)
                aborted, self._abort_after_step = self._abort_after_step, set()
                outputs = [self._process(seq, token) for seq, token in zip(sampling, tokens, strict=True)
                           if seq.request_id not in aborted]
                for request_id in aborted:
                    self.abort(request_id)
                self._record(scheduled, time.perf_counter() - started)
                return outputs

    def _record(self, scheduled: ScheduledBatch, seconds: float) -> None:
        decodes = [seq.num_computed_tokens for seq, n in scheduled if n == 1]  # already counts the new token
        self.step_records.append(StepRecord(time.time(), seconds, tuple(n for _, n in scheduled if n > 1),
                                            len(decodes), sum(decodes)))

    def take_step_records(self) -> list[StepRecord]:
        """The steps recorded since the last call (at most STEP_RECORDS of them)."""
        with self.lock:
            records = list(self.step_records)
            self.step_records.clear()
            return records

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        if self.compiled is not None and self.compiled.covers(batch):
            return self.compiled(batch)
        return self.model(batch, self.cache)

    def _build_batch(self, scheduled: ScheduledBatch) -> tuple[ForwardBatch, list[Sequence]]:
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

    def _process(self, seq: Sequence, token: int) -> StepOutput:
        was_waiting = seq.status is Status.WAITING
        text = seq.append_token(token, self.tokenizer.eos_token_ids, self.max_model_len)
        output = StepOutput(seq.request_id, token, text, seq.finish_reason is not None, seq.finish_reason,
                            seq.num_prompt_tokens, seq.num_output_tokens)
        if was_waiting:
            self.scheduler.finish_prefill(seq)
        if seq.finish_reason is not None:
            if not was_waiting:
                self.scheduler.running.remove(seq)
            self._finish(seq)
        elif was_waiting and self.config.role == "prefill":
            seq.status = Status.HELD
            self.held[seq.request_id] = seq
        elif was_waiting:
            seq.status = Status.RUNNING
            self.scheduler.running.append(seq)
        return output

    def _finish(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.status = Status.FINISHED
        self.held.pop(seq.request_id, None)
        self.importing.pop(seq.request_id, None)
        self.staging.pop(seq.request_id, None)
        self.sequences.pop(seq.request_id, None)

    # -- KV hand-off ----------------------------------------------------------------------------

    def kv_export(self, request_id: str) -> KVExport:
        with self.lock:
            seq = self.held.get(request_id)
            if seq is None:
                raise KeyError(f"no held request {request_id!r} (finished, aborted or never prefilled here)")
            meta = KVMeta(
                request_id=request_id, prompt_token_ids=seq.prompt_token_ids,
                output_token_ids=seq.output_token_ids, params=seq.params,
                num_kv_tokens=seq.num_computed_tokens, num_blocks=len(seq.block_table),
                block_size=self.config.block_size, block_nbytes=self.cache.block_nbytes,
                output_text=seq.text, num_emitted_chars=seq.num_emitted_chars, dtype=self.config.dtype,
            )
            return KVExport(meta, self.cache.views(seq.block_table))

    def can_import(self, num_kv_tokens: int) -> bool:
        with self.lock:
            # One block of headroom so the request can decode its next token right away.
            return self.blocks.can_allocate(self.blocks.blocks_needed(num_kv_tokens + 1))

    def kv_import_begin(self, meta: KVMeta) -> list[torch.Tensor] | None:
        """Reserve blocks for an incoming request; the views its KV bytes go to, or None if no room.

        KV in another dtype than this engine's goes to a staging buffer and is converted at commit."""
        source = DTYPES.get(meta.dtype)
        if source is None:
            raise ValueError(f"KV dtype {meta.dtype!r} is not one of {', '.join(DTYPES)}")
        block_numel = self.cache.data[0].numel()
        if meta.block_size != self.config.block_size or meta.block_nbytes != block_numel * source.itemsize:
            raise ValueError("KV layout mismatch between prefill and decode (model or block size differ)")
        self.validate(meta.prompt_token_ids, meta.params)
        with self.lock:
            if meta.request_id in self.sequences:
                raise ValueError(f"request id {meta.request_id!r} is already in use")
            if not self.can_import(meta.num_kv_tokens):
                return None
            seq = Sequence(meta.request_id, meta.prompt_token_ids, meta.params, self.tokenizer,
                           output_token_ids=meta.output_token_ids)
            seq.text, seq.num_emitted_chars = meta.output_text, meta.num_emitted_chars
            seq.block_table = self.blocks.allocate(meta.num_blocks)
            seq.num_computed_tokens = meta.num_kv_tokens
            seq.status = Status.IMPORTING
            self.sequences[meta.request_id] = seq
            self.importing[meta.request_id] = seq
            if source == self.cache.data.dtype:
                return self.cache.views(seq.block_table)
            staging = torch.empty(meta.num_blocks, *self.cache.data.shape[1:], dtype=source)
            self.staging[meta.request_id] = staging
            return [staging]

    def kv_import_commit(self, request_id: str) -> None:
        with self.lock:
            seq = self.importing.pop(request_id)
            staging = self.staging.pop(request_id, None)
            if staging is not None:  # convert straight into the blocks: copy_ casts, no intermediate copy
                start = 0
                for view in self.cache.views(seq.block_table):
                    view.copy_(staging[start:start + len(view)])
                    start += len(view)
            seq.status = Status.RUNNING
            self.scheduler.running.append(seq)

    def kv_import_recompute(self, request_id: str) -> None:
        """The transfer failed: compute the request's KV here from its tokens instead (same continuation)."""
        with self.lock:
            seq = self.importing.pop(request_id)
            self.staging.pop(request_id, None)
            seq.num_computed_tokens = 0  # its reserved blocks stay: the prefill fills them
            seq.status = Status.WAITING
            self.scheduler.waiting.append(seq)

    def kv_import_abort(self, request_id: str) -> None:
        with self.lock:
            seq = self.importing.get(request_id)
            if seq is not None:
                self._finish(seq)

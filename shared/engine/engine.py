"""LLMEngine: the loop over a scheduler and a model runner, behind one small API (docs/engine-api.md).

A step: the scheduler picks the work (`Scheduler.schedule`), the runner prepares, runs and samples it
(`ModelRunner`), the scheduler applies the new tokens (`Scheduler.postprocess`). The KV hand-off
methods export a held request's KV and import one computed elsewhere; the services drive them from
services/worker/kv_handoff.py.

Thread safety: every public method takes the engine's lock, so a worker may run `step()` in its own
thread while its event loop adds, aborts, exports and imports requests. `step()` holds the lock only
to schedule and to process outputs, not during the forward pass: a KV import can reserve blocks and
join the batch, and a release can free blocks, while the model computes. The one call that would
touch the forward's own blocks, aborting a request in the running batch, waits for the step's end.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from shared.engine.config import EngineConfig
from shared.engine.kv_cache import BlockManager
from shared.engine.model_runner import DTYPES, ModelRunner
from shared.engine.scheduler import ScheduledBatch, Scheduler
from shared.engine.sequence import Sequence
from shared.model_files import model_display_name
from shared.protocol import KVMeta
from shared.sampling_params import SamplingParams
from shared.tokenizer import Tokenizer, load_tokenizer

STEP_RECORDS = 4096  # steps kept for take_step_records (about 7 minutes of busy steps)


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
        self.runner = ModelRunner(config)
        self.model, self.model_config, self.cache = self.runner.model, self.runner.model_config, self.runner.cache
        self.compiled = self.runner.compiled
        self.tokenizer: Tokenizer = load_tokenizer("default" if config.model.startswith("random:") else config.model)
        self.model_name = model_display_name(config.model)
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        self.blocks = BlockManager(self.cache.num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.blocks, self.tokenizer.eos_token_ids, self.max_model_len)
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

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    output_token_ids: list[int] | None = None, num_emitted_chars: int | None = None) -> None:
        """Queue a request. A migrated one brings the tokens it already generated elsewhere (and how much
        of their text its client has): their KV is computed with the prompt's and generation continues."""
        self.validate(prompt_token_ids, params)
        if output_token_ids and len(output_token_ids) >= params.max_tokens:
            raise ValueError("a resumed request has no tokens left to generate")
        seq = Sequence(request_id, prompt_token_ids, params, self.tokenizer, output_token_ids=output_token_ids)
        if num_emitted_chars is not None:
            seq.num_emitted_chars = min(num_emitted_chars, len(seq.text))
        with self.lock:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        with self.lock:
            if request_id in self._in_flight:  # its blocks are being written: free them after the step
                self._abort_after_step.add(request_id)
                return self.scheduler.get(request_id) is not None
            return self.scheduler.abort(request_id)

    def release(self, request_id: str) -> None:
        """Prefill role: the decode side has the KV now; free it."""
        with self.lock:
            self.scheduler.release(request_id)

    def has_unfinished(self) -> bool:
        with self.lock:
            return self.scheduler.has_unfinished()

    # Read-only views of the scheduler's state, for inspection.
    @property
    def sequences(self) -> Mapping[str, Sequence]:
        return self.scheduler.sequences

    @property
    def held(self) -> Mapping[str, Sequence]:
        return self.scheduler.held

    @property
    def staging(self) -> Mapping[str, torch.Tensor]:
        """Imported KV in another dtype than the engine's, waiting for its commit to convert it."""
        return {rid: seq.kv_staging for rid, seq in self.scheduler.importing.items() if seq.kv_staging is not None}

    def stats(self) -> EngineStats:
        with self.lock:
            s = self.scheduler
            return EngineStats(
                num_waiting=len(s.waiting), num_running=len(s.running), num_held=len(s.held),
                free_blocks=self.blocks.num_free, total_blocks=self.blocks.num_blocks,
                queued_prompt_tokens=s.queued_prompt_tokens(),
            )

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        with self._stepping:
            started = time.perf_counter()
            with self.lock:
                scheduled = self.scheduler.schedule()
                if not scheduled:
                    return []
                batch, sampling = self.runner.prepare(scheduled)
                self._in_flight = frozenset(seq.request_id for seq, _ in scheduled)
            try:
                logits = self.runner.forward(batch)  # without the lock: see the module docstring
            except BaseException:
                with self.lock:
                    self._in_flight = frozenset()
                raise
            with self.lock:
                self._in_flight = frozenset()
                tokens = self.runner.sample(logits, sampling)
                aborted, self._abort_after_step = self._abort_after_step, set()
                emitted = self.scheduler.postprocess(scheduled, sampling, tokens, skip=aborted)
                for request_id in aborted:
                    self.scheduler.abort(request_id)
                self._record(scheduled, time.perf_counter() - started)
                return [StepOutput(seq.request_id, seq.token_ids[-1], text, seq.finish_reason is not None,
                                   seq.finish_reason, seq.num_prompt_tokens, seq.num_output_tokens)
                        for seq, text in emitted]

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

    # -- KV hand-off (the engine's half; the services' half is services/worker/kv_handoff.py) -------------

    def kv_export(self, request_id: str) -> KVExport:
        with self.lock:
            seq = self.scheduler.held.get(request_id)
            if seq is None:
                raise KeyError(f"no held request {request_id!r} (finished, aborted or never prefilled here)")
            meta = KVMeta(
                request_id=request_id, prompt_token_ids=seq.prompt_token_ids,
                output_token_ids=seq.output_token_ids, params=seq.params,
                num_kv_tokens=seq.num_computed_tokens, num_blocks=len(seq.block_table),
                block_size=self.config.block_size, block_nbytes=self.cache.block_nbytes,
                output_text=seq.text, num_emitted_chars=seq.num_emitted_chars, dtype=self.config.dtype,
            )
            return KVExport(meta, self.runner.kv_views(seq.block_table))

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
            if self.scheduler.get(meta.request_id) is not None:
                raise ValueError(f"request id {meta.request_id!r} is already in use")
            if not self.can_import(meta.num_kv_tokens):
                return None
            seq = Sequence(meta.request_id, meta.prompt_token_ids, meta.params, self.tokenizer,
                           output_token_ids=meta.output_token_ids)
            if meta.output_text is not None:  # else the text decoded from the tokens
                seq.text = meta.output_text
            seq.num_emitted_chars = min(meta.num_emitted_chars, len(seq.text))
            self.scheduler.begin_import(seq, meta.num_blocks, meta.num_kv_tokens)
            if source == self.cache.data.dtype:
                return self.runner.kv_views(seq.block_table)
            seq.kv_staging = self.runner.kv_staging(meta.num_blocks, source)
            return [seq.kv_staging]

    def kv_import_commit(self, request_id: str) -> None:
        with self.lock:
            seq = self.scheduler.commit_import(request_id)
            if seq.kv_staging is not None:
                self.runner.commit_staging(seq.kv_staging, seq.block_table)
                seq.kv_staging = None

    def kv_import_recompute(self, request_id: str) -> None:
        """The transfer failed: compute the request's KV here from its tokens instead (same continuation)."""
        with self.lock:
            self.scheduler.recompute_import(request_id).kv_staging = None

    def kv_import_set_aside(self, request_id: str) -> list[int]:
        """A failed transfer may still write into the request's reserved blocks: they leave it, still
        allocated (the recompute, or the abort, works on fresh ones), until `free_set_aside`."""
        with self.lock:
            seq = self.scheduler.importing.get(request_id)
            if seq is None:
                return []
            blocks, seq.block_table = seq.block_table, []
            return blocks

    def free_set_aside(self, blocks: list[int]) -> None:
        with self.lock:
            self.blocks.free(blocks)

    def kv_import_abort(self, request_id: str) -> None:
        with self.lock:
            if request_id in self.scheduler.importing:
                self.scheduler.abort(request_id)

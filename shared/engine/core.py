"""EngineCore: what every engine shares: requests, the scheduler and its blocks, the step's bookkeeping,
the KV hand-off's engine half. No torch here.

A step: the scheduler picks the work (`Scheduler.schedule`), the subclass computes it (`_prepare` under
the lock, `_compute` without it, `_sample` under it again), the scheduler applies the new tokens
(`Scheduler.postprocess`). `LLMEngine` (shared/engine/engine.py) computes with the model;
`EmulatedEngine` (shared/engine/emulated.py) waits the time a latency profile gives.

Thread safety: every public method takes the engine's lock, so a worker may run `step()` in its own
thread while its event loop adds, aborts, exports and imports requests. `step()` holds the lock only
to schedule and to process outputs, not during the compute: a KV import can reserve blocks and join
the batch, and a release can free blocks, while the model computes. The one call that would touch
the compute's own blocks, aborting a request in the running batch, waits for the step's end.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from shared.engine.api import EngineStats, KVExport, KVImport, KVView, StepOutput, StepRecord
from shared.engine.blocks import BlockManager
from shared.engine.config import EngineConfig
from shared.engine.scheduler import ScheduledBatch, Scheduler
from shared.engine.sequence import Sequence, Status
from shared.protocol import KVHandle, KVMeta
from shared.sampling_params import SamplingParams
from shared.tokenizer import Tokenizer

STEP_RECORDS = 4096  # steps kept for take_step_records (about 7 minutes of busy steps)


class EngineCore(ABC):
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer, model_name: str, max_model_len: int,
                 vocab_size: int, num_blocks: int) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.blocks, tokenizer.eos_token_ids, max_model_len)
        self.lock = threading.RLock()
        self._stepping = threading.Lock()  # one compute at a time
        self._in_flight: frozenset[str] = frozenset()  # requests being computed now
        self._abort_after_step: set[str] = set()  # aborted while in flight: freed when the step ends
        # The latest steps, for fitting a latency profile to the steps served (take_step_records)
        self.step_records: deque[StepRecord] = deque(maxlen=STEP_RECORDS)

    # -- what an engine provides -----------------------------------------------------------------------

    @property
    @abstractmethod
    def label(self) -> str:
        """What computes the steps, for logs and metrics: 'torch-cpu', 'emulated-a100', ..."""

    @abstractmethod
    def _prepare(self, scheduled: ScheduledBatch) -> tuple[Any, list[Sequence]]:
        """Under the lock: the work to compute, and the sequences that get a new token from it."""

    @abstractmethod
    def _compute(self, work: Any) -> Any:
        """Without the lock: compute the work (writing its K/V into the blocks)."""

    @abstractmethod
    def _sample(self, computed: Any, sampled: list[Sequence]) -> list[int]:
        """Under the lock: the new token of each sampled sequence."""

    @property
    @abstractmethod
    def block_nbytes(self) -> int:
        """Bytes of one KV block as the transport moves it."""

    @property
    @abstractmethod
    def kv_dtype(self) -> str:
        """The exported KV's dtype (KVMeta.dtype)."""

    @abstractmethod
    def kv_views(self, block_ids: list[int]) -> list[KVView]:
        """The blocks' bytes as contiguous views, in token order."""

    def _import_target(self, seq: Sequence, meta: KVMeta) -> KVImport:
        """Where an import's bytes go: here its blocks, as one byte stream (an engine whose KV has heads says
        which it holds, and may stage them)."""
        return KVImport(self.kv_views(seq.block_table))

    def _check_import(self, meta: KVMeta) -> None:
        """Raise ValueError if KV of this layout cannot be imported here."""
        if meta.dtype != self.kv_dtype or meta.block_size != self.config.block_size \
                or meta.block_nbytes != self.block_nbytes:
            raise ValueError("KV layout mismatch between prefill and decode (model, dtype or block size differ)")

    def _commit_staging(self, seq: Sequence) -> None:
        """An import through a staging buffer (`_import_target` made one): its bytes into the blocks."""
        raise NotImplementedError(f"{type(self).__name__} imports KV without staging")

    def _kv_dropped(self, request_id: str) -> None:
        """The request's KV leaves the hand-off otherwise than by a commit here (abort, release, recompute):
        nothing to do here (a tensor-parallel engine's other ranks drop what they hold of it)."""
        return None

    def modelled_transfer_s(self, meta: KVMeta) -> float:
        """Seconds a pull of this KV takes on top of moving its bytes here: 0, every byte moves for real."""
        return 0.0

    def close(self) -> None:
        """Release what the engine runs besides this process (the other ranks of a tensor-parallel one)."""
        return None

    # -- requests -------------------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError with a user-facing message if this request can never be served."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty")
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
                             f"context length of {self.max_model_len} tokens")
        if any(t < 0 or t >= self.vocab_size for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
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
            self._work_changed()

    def _work_changed(self) -> None:
        """A request joined the queue or blocks were freed (the emulated pipeline waits on it); by default
        nothing: the worker's step loop is woken by every call anyway."""
        return None

    def abort(self, request_id: str) -> bool:
        self._kv_dropped(request_id)
        with self.lock:
            if request_id in self._in_flight:  # its blocks are being written: free them after the step
                self._abort_after_step.add(request_id)
                return self.scheduler.get(request_id) is not None
            self._work_changed()
            return self.scheduler.abort(request_id)

    def withdraw(self, request_id: str) -> bool:
        """Give up a request that has not started (waiting, nothing of it computed), so that it can run on
        another worker; False, and it stays, once its prefill has begun."""
        with self.lock:
            seq = self.scheduler.get(request_id)
            if request_id in self._in_flight or seq is None or seq.status is not Status.WAITING \
                    or seq.num_computed_tokens:
                return False
            self._work_changed()
            return self.scheduler.abort(request_id)

    def release(self, request_id: str) -> None:
        """Prefill role: the decode side has the KV now; free it."""
        self._kv_dropped(request_id)
        with self.lock:
            self.scheduler.release(request_id)
            self._work_changed()

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
                work, sampled = self._prepare(scheduled)
                self._in_flight = frozenset(seq.request_id for seq, _ in scheduled)
            try:
                computed = self._compute(work)  # without the lock: see the module docstring
            except BaseException:
                with self.lock:
                    self._in_flight = frozenset()
                raise
            with self.lock:
                self._in_flight = frozenset()
                tokens = self._sample(computed, sampled)
                aborted, self._abort_after_step = self._abort_after_step, set()
                return self._finish_step(scheduled, sampled, tokens, aborted, time.perf_counter() - started)

    def _finish_step(self, scheduled: ScheduledBatch, sampled: list[Sequence], tokens: list[int],
                     aborted: set[str], seconds: float) -> list[StepOutput]:
        """Under the lock: apply the step's tokens, free what was aborted meanwhile, record the step."""
        emitted = self.scheduler.postprocess(scheduled, sampled, tokens, skip=aborted)
        for request_id in aborted:
            self.scheduler.abort(request_id)
        self._record(scheduled, seconds)
        return [StepOutput(seq.request_id, seq.token_ids[-1], text, seq.finish_reason is not None,
                           seq.finish_reason, seq.num_prompt_tokens, seq.num_output_tokens)
                for seq, text in emitted]

    @staticmethod
    def sampled_by(scheduled: ScheduledBatch) -> list[Sequence]:
        """The sequences whose every known token is computed by this batch: each gets a new one."""
        return [seq for seq, n in scheduled if seq.num_computed_tokens + n == seq.num_tokens]

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
                block_size=self.config.block_size, block_nbytes=self.block_nbytes,
                output_text=seq.text, num_emitted_chars=seq.num_emitted_chars, dtype=self.kv_dtype,
            )
            return KVExport(meta, self.kv_views(seq.block_table))

    def can_import(self, num_kv_tokens: int) -> bool:
        with self.lock:
            # One block of headroom so the request can decode its next token right away.
            return self.blocks.can_allocate(self.blocks.blocks_needed(num_kv_tokens + 1))

    def kv_import_begin(self, meta: KVMeta) -> KVImport | None:
        """Reserve blocks for an incoming request; where its KV bytes go, or None if no room."""
        self._check_import(meta)
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
            return self._import_target(seq, meta)

    def kv_import_ranks(self, kv: KVHandle, timeout: float) -> Future[int] | None:
        """No other ranks here: the worker's pull fills everything `kv_import_begin` gave."""
        return None

    def kv_import_commit(self, request_id: str) -> None:
        with self.lock:
            seq = self.scheduler.commit_import(request_id)
            if seq.kv_staging is not None:
                self._commit_staging(seq)
                seq.kv_staging = None

    def kv_import_recompute(self, request_id: str) -> None:
        """The transfer failed: compute the request's KV here from its tokens instead (same continuation)."""
        self._kv_dropped(request_id)
        with self.lock:
            self.scheduler.recompute_import(request_id).kv_staging = None
            self._work_changed()

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
        self._kv_dropped(request_id)
        with self.lock:
            if request_id in self.scheduler.importing:
                self.scheduler.abort(request_id)

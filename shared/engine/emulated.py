"""EmulatedEngine: the engine API with the model replaced by a clock, to rehearse GPU deployments here.

Everything that serves is the real one (EngineCore: the scheduler, its blocks, token-budget and
continuous batching, the KV hand-off's engine half); only the compute is modelled. A step lasts the
time `StepTimes` gives for its batch on the emulated GPU at the instance's TP and PP, then emits
deterministic placeholder tokens (the same text for a request wherever it runs, so a migrated
request continues its stream exactly). No torch: KV blocks are a numpy byte array.

KV bytes: the real model's KV per token is too large to move for many requests on one host, so a
block holds `kv_fraction` of its real bytes; those move over the real transport and the rest of the
transfer is modelled link time (`modelled_transfer_s`, which the decode side waits after its pull).

Pipeline parallelism: a decode round over n requests in k = min(pp, n) micro-batches takes
A + (B * context + C * n) / k (services/planner/batch.py); a prefill batch takes T over pp stages of
T / pp, and a prefill worker starts its next batch as soon as stage 1 is free (`_step_pipelined`), as
the simulator's prefill instance does.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from shared.engine.api import EngineStats, KVView, StepOutput
from shared.engine.blocks import runs
from shared.engine.config import EngineConfig
from shared.engine.core import EngineCore
from shared.engine.scheduler import ScheduledBatch
from shared.engine.sequence import Sequence
from shared.protocol import KVMeta
from shared.tokenizer import Tokenizer

EMULATED_KV_DTYPE = "emulated"  # KVMeta.dtype of emulated KV: a torch engine refuses it
PLACEHOLDER_TEXT = " Emulated tokens: the step took the time the latency profile gives for this batch."


class StepTimes(Protocol):
    """Seconds of the emulated steps, for one instance (its GPU, model, TP and PP)."""

    def prefill(self, lengths: list[int]) -> float:
        """A batch of prompt lengths through every pipeline stage."""

    def decode(self, batch: int, context: int) -> float:
        """One decode round: every one of `batch` requests gets a token; `context` tokens attended in all."""


@dataclass(frozen=True)
class EmulatedGPU:
    """One emulated instance: what it is, how fast it steps, how much KV it holds and how it moves."""

    label: str  # "emulated-a100"
    model_name: str  # "opt-13b"
    times: StepTimes
    pp: int
    kv_capacity_tokens: int  # the instance's KV memory (its GPUs' memory minus the weights)
    kv_bytes_per_token: int  # of the real model
    kv_fraction: float  # of the real KV bytes that move over the transport
    link_bytes_per_s: float  # the prefill-to-decode link, for the rest
    max_model_len: int = 2048

    @property
    def description(self) -> str:
        return (f"{self.model_name} on {self.label}, {self.kv_capacity_tokens} KV tokens; KV moves at "
                f"{self.kv_fraction:g} of its real size, the rest modelled at "
                f"{self.link_bytes_per_s * 8 / 1e9:g} Gbps; tokens are placeholders")


@dataclass
class _Flight:
    """A prefill batch in the pipeline: out of the queue until its last stage ends."""

    done_at: float  # perf_counter time
    scheduled: ScheduledBatch
    started: float


class EmulatedEngine(EngineCore):
    def __init__(self, config: EngineConfig, gpu: EmulatedGPU, tokenizer: Tokenizer) -> None:
        self.gpu = gpu
        self._block_nbytes = max(1, round(config.block_size * gpu.kv_bytes_per_token * gpu.kv_fraction))
        num_blocks = gpu.kv_capacity_tokens // config.block_size
        if num_blocks < 1:
            raise ValueError(f"{gpu.model_name} leaves no KV memory on {gpu.label} at tp={config.tp}, "
                             f"pp={config.pp}")
        max_model_len = min(config.max_model_len or gpu.max_model_len, gpu.max_model_len)
        super().__init__(config, tokenizer, gpu.model_name, max_model_len, tokenizer.vocab_size, num_blocks)
        # np.zeros maps untouched pages lazily: only the blocks that KV lands in take memory
        self.kv = np.zeros((num_blocks, self._block_nbytes), dtype=np.uint8)
        self._placeholder = tokenizer.encode(PLACEHOLDER_TEXT)
        self._pipelined = config.role == "prefill" and gpu.pp > 1
        self._flights: deque[_Flight] = deque()
        self._stage_free = [0.0] * gpu.pp
        self._changed = threading.Event()  # a request came, or memory was freed

    @property
    def label(self) -> str:
        return self.gpu.label

    # -- the modelled compute ------------------------------------------------------------------------------

    def step_seconds(self, scheduled: ScheduledBatch) -> float:
        """A step's time: its prefill work through the pipeline, plus one decode round of its decodes."""
        prefills = [n for _, n in scheduled if n > 1]
        decodes = [seq.num_computed_tokens + 1 for seq, n in scheduled if n == 1]  # the new position included
        seconds = self.gpu.times.prefill(prefills) if prefills else 0.0
        if decodes:
            seconds += self.gpu.times.decode(len(decodes), sum(decodes))
        return seconds

    def _prepare(self, scheduled: ScheduledBatch) -> tuple[float, list[Sequence]]:
        """The time the step ends. A profile times whole steps, its system's own overhead included: ours
        (scheduling here, outputs after) takes the place of theirs rather than adding to it."""
        return time.perf_counter() + self.step_seconds(scheduled), self.sampled_by(scheduled)

    def _compute(self, work: float) -> None:
        time.sleep(max(0.0, work - time.perf_counter()))  # the emulated GPU at work

    def _sample(self, computed: object, sampled: list[Sequence]) -> list[int]:
        return [self._placeholder[seq.num_output_tokens % len(self._placeholder)] for seq in sampled]

    # -- a pipelined prefill worker ------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        with self.lock:
            return bool(self._flights) or self.scheduler.has_unfinished()

    def _work_changed(self) -> None:
        self._changed.set()

    def step(self) -> list[StepOutput]:
        return self._step_pipelined() if self._pipelined else super().step()

    def _step_pipelined(self) -> list[StepOutput]:
        """Start batches whenever stage 1 is free; return the outputs of the first batch to leave the last stage."""
        with self._stepping:
            while True:
                with self.lock:
                    now = time.perf_counter()
                    if self._stage_free[0] <= now:
                        self._launch(now)
                    if self._flights and self._flights[0].done_at <= now:
                        return self._land(self._flights.popleft())
                    if not self._flights:
                        return []  # nothing in the pipeline and nothing it could start
                    wake = self._flights[0].done_at
                    if self.scheduler.waiting and self._stage_free[0] > now:
                        wake = min(wake, self._stage_free[0])
                    self._changed.clear()  # under the lock: a change from here on ends the wait
                self._changed.wait(max(0.0, wake - now))

    def _launch(self, now: float) -> None:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return
        stage = self.step_seconds(scheduled) / self.gpu.pp
        t = now
        for k in range(self.gpu.pp):  # a batch may wait for the one ahead of it at any stage
            t = max(t, self._stage_free[k]) + stage
            self._stage_free[k] = t
        for seq, _ in scheduled:  # out of the queue while in the pipeline (back for postprocess)
            self.scheduler.waiting.remove(seq)
        self._flights.append(_Flight(t, scheduled, now))
        self._in_flight = frozenset(seq.request_id for f in self._flights for seq, _ in f.scheduled)

    def _land(self, flight: _Flight) -> list[StepOutput]:
        self.scheduler.waiting.extendleft(seq for seq, _ in reversed(flight.scheduled))
        self._in_flight = frozenset(seq.request_id for f in self._flights for seq, _ in f.scheduled)
        ids = {seq.request_id for seq, _ in flight.scheduled}
        aborted = self._abort_after_step & ids
        self._abort_after_step -= aborted
        sampled = self.sampled_by(flight.scheduled)
        return self._finish_step(flight.scheduled, sampled, self._sample(None, sampled), aborted,
                                 time.perf_counter() - flight.started)

    def stats(self) -> EngineStats:
        """As a prefill engine counts them, a prompt in the pipeline is still queued until its prefill ends."""
        with self.lock:
            stats = super().stats()
            flying = [(seq, n) for f in self._flights for seq, n in f.scheduled]
        if not flying:
            return stats
        return replace(stats, num_waiting=stats.num_waiting + len(flying),
                       queued_prompt_tokens=stats.queued_prompt_tokens + sum(n for _, n in flying))

    # -- KV: a fraction of the real bytes, the rest as link time ---------------------------------------------

    @property
    def block_nbytes(self) -> int:
        return self._block_nbytes

    @property
    def kv_dtype(self) -> str:
        return EMULATED_KV_DTYPE

    def kv_views(self, block_ids: list[int]) -> list[KVView]:
        return [self.kv[start:start + length] for start, length in runs(block_ids)]

    def modelled_transfer_s(self, meta: KVMeta) -> float:
        real = meta.num_kv_tokens * self.gpu.kv_bytes_per_token
        return (1 - self.gpu.kv_fraction) * real / self.gpu.link_bytes_per_s

"""The scheduler: which sequences run in the next forward pass, and every change of a sequence's status.

It owns the engine's queues and is the only code that moves a sequence between them:

    add ──► WAITING ──(prompt computed)──► RUNNING ──(finished)──► FINISHED
                │                           │  ▲
                │ prefill role              │  └─ commit_import ◄── IMPORTING ◄── begin_import (decode role)
                ▼                           │                          │
              HELD ──(release)──► FINISHED  └─(preempt)──► WAITING ◄───┘ recompute_import

`abort` ends a sequence in any status. Finishing frees its KV blocks.

Every unit of work is "compute K/V for tokens [num_computed, num_computed + n) of a sequence": a
prompt, a prompt chunk, a recomputation after preemption, or one decode token (n = 1). The policy:

- prefill-first (vLLM; prefill and decode roles): `schedule_prefill() or schedule_decode()`;
- chunked prefill (Sarathi-Serve; colocated only): every running decode, then prompt chunks in the
  token budget that is left.

Prefill is FCFS under the token budget (DistServe's L_m); a prompt longer than the budget runs alone.
The head of the queue is never skipped: when its blocks do not fit, nothing behind it starts either.
"""

from __future__ import annotations

from collections import deque

from shared.engine.blocks import BlockManager
from shared.engine.config import EngineConfig
from shared.engine.sequence import Sequence, Status

ScheduledBatch = list[tuple[Sequence, int]]  # (sequence, number of new tokens)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, eos_token_ids: frozenset[int],
                 max_model_len: int) -> None:
        self.config = config
        self.blocks = blocks
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()  # FCFS; a sequence stays here until its prompt is computed
        self.running: list[Sequence] = []  # the decode batch
        self.held: dict[str, Sequence] = {}  # prefill role: KV kept for the decode side
        self.importing: dict[str, Sequence] = {}  # decode role: blocks reserved, KV bytes arriving
        self.sequences: dict[str, Sequence] = {}  # every unfinished sequence, by request id

    # -- queries -----------------------------------------------------------------------------------

    def get(self, request_id: str) -> Sequence | None:
        return self.sequences.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def queued_prompt_tokens(self) -> int:
        return sum(seq.num_uncomputed_tokens for seq in self.waiting)

    # -- status transitions ---------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self._register(seq)
        self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """End a sequence wherever it is and free its blocks; False if there is none."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return False
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is Status.RUNNING:
            self.running.remove(seq)
        self._finish(seq)
        return True

    def release(self, request_id: str) -> None:
        """Prefill role: the decode side has the KV now; free it."""
        seq = self.held.get(request_id)
        if seq is None:
            raise KeyError(f"no held request {request_id!r}")
        self._finish(seq)

    def begin_import(self, seq: Sequence, num_blocks: int, num_kv_tokens: int) -> None:
        """Decode role: reserve blocks for a sequence whose KV is computed elsewhere."""
        self._register(seq)
        seq.block_table = self.blocks.allocate(num_blocks)  # the engine checked can_import under its lock
        seq.num_computed_tokens = num_kv_tokens
        seq.status = Status.IMPORTING
        self.importing[seq.request_id] = seq

    def commit_import(self, request_id: str) -> Sequence:
        seq = self.importing.pop(request_id)
        seq.status = Status.RUNNING
        self.running.append(seq)
        return seq

    def recompute_import(self, request_id: str) -> Sequence:
        """The KV did not arrive: compute it here from the tokens (its reserved blocks stay, the prefill fills them)."""
        seq = self.importing.pop(request_id)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.append(seq)
        return seq

    def postprocess(self, scheduled: ScheduledBatch, sampled: list[Sequence], tokens: list[int],
                    skip: set[str]) -> list[tuple[Sequence, str]]:
        """After a forward pass: count the computed tokens, append the sampled ones, move whoever changed phase.

        `skip`: sequences aborted while the pass ran (the engine frees them next). Returns each sampled
        sequence with the text it may now stream.
        """
        for seq, n in scheduled:
            seq.num_computed_tokens += n
        emitted: list[tuple[Sequence, str]] = []
        for seq, token in zip(sampled, tokens, strict=True):
            if seq.request_id in skip:
                continue
            emitted.append((seq, seq.append_token(token, self.eos_token_ids, self.max_model_len)))
            prefilled = seq.status is Status.WAITING  # this token is its first (or first after a recompute)
            if prefilled:
                self.waiting.remove(seq)
            if seq.finish_reason is not None:
                if not prefilled:
                    self.running.remove(seq)
                self._finish(seq)
            elif prefilled and self.config.role == "prefill":
                seq.status = Status.HELD
                self.held[seq.request_id] = seq
            elif prefilled:
                seq.status = Status.RUNNING
                self.running.append(seq)
        return emitted

    def _register(self, seq: Sequence) -> None:
        if seq.request_id in self.sequences:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self.sequences[seq.request_id] = seq

    def _finish(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.status = Status.FINISHED
        seq.kv_staging = None
        self.held.pop(seq.request_id, None)
        self.importing.pop(seq.request_id, None)
        self.sequences.pop(seq.request_id, None)

    # -- the policy -----------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        if self.config.chunked_prefill:
            batch = self.schedule_decode()
            used = len(batch)
            return batch + self.schedule_prefill(self.config.max_num_batched_tokens - used, chunked=True)
        return self.schedule_prefill(self.config.max_num_batched_tokens) or self.schedule_decode()

    def schedule_prefill(self, budget: int, chunked: bool = False) -> ScheduledBatch:
        batch: ScheduledBatch = []
        for seq in self.waiting:
            if budget <= 0 or len(self.running) + len(batch) >= self._max_running():
                break
            n = seq.num_uncomputed_tokens
            if n > budget:
                if chunked:
                    n = budget
                elif batch:
                    break  # a long prompt runs alone, in the next step
            if not self.blocks.grow(seq.block_table, seq.num_computed_tokens + n):
                break  # back-pressure: wait for memory, keep FCFS order
            batch.append((seq, n))
            budget -= n
        return batch

    def schedule_decode(self) -> ScheduledBatch:
        batch: ScheduledBatch = []
        for seq in list(self.running):
            if len(batch) >= self.config.max_num_seqs:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            while not self.blocks.grow(seq.block_table, seq.num_tokens):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    return batch
            batch.append((seq, 1))
        return batch

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it re-prefills prompt and output later (recompute)."""
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _max_running(self) -> int:
        # The prefill role keeps no decode batch: its limit is KV memory, checked per prompt.
        return self.config.max_num_seqs if self.config.role != "prefill" else 1 << 30

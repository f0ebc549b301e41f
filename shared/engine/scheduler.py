"""Which sequences run in the next forward pass, and how many tokens of each.

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

from shared.engine.config import EngineConfig
from shared.engine.kv_cache import BlockManager
from shared.engine.sequence import Sequence, Status

ScheduledBatch = list[tuple[Sequence, int]]  # (sequence, number of new tokens)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

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

    def finish_prefill(self, seq: Sequence) -> None:
        """A waiting sequence's last uncomputed token ran: it leaves the queue."""
        self.waiting.remove(seq)

    def _max_running(self) -> int:
        # The prefill role keeps no decode batch: its limit is KV memory, checked per prompt.
        return self.config.max_num_seqs if self.config.role != "prefill" else 1 << 30

    def queued_prompt_tokens(self) -> int:
        return sum(seq.num_uncomputed_tokens for seq in self.waiting)

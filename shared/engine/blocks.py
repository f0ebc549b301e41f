"""KV blocks: which are free, who holds them. No storage here: an engine keeps its blocks' bytes
(shared/engine/kv_cache.py for the model's tensors, shared/engine/emulated.py for the emulator's)."""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """(first id, length) of each run of consecutive ids, in order: one contiguous byte range each."""
    found: list[tuple[int, int]] = []
    for block in block_ids:
        if found and found[-1][0] + found[-1][1] == block:
            found[-1] = (found[-1][0], found[-1][1] + 1)
        else:
            found.append((block, 1))
    return found


class BlockManager:
    """Hands out KV blocks. Lowest free id first, so a request's blocks tend to be one contiguous run."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks))  # a min-heap
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise MemoryError(f"need {num_blocks} KV blocks, {len(self._free)} free")
        blocks = [heapq.heappop(self._free) for _ in range(num_blocks)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend block_table to hold num_tokens tokens. False (and no change) if memory is short."""
        extra = self.blocks_needed(num_tokens) - len(block_table)
        if extra <= 0:
            return True
        if not self.can_allocate(extra):
            return False
        block_table.extend(self.allocate(extra))
        return True

    def free(self, block_table: list[int]) -> None:
        for b in block_table:
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                heapq.heappush(self._free, b)
        block_table.clear()

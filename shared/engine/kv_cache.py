"""The paged KV cache: block-major tensor storage (the block manager that hands out its blocks is
shared/engine/blocks.py).

Layout: one tensor [num_blocks, num_layers, 2 (K, V), block_size, kv_heads, head_dim]. A block holds
every layer's K and V for `block_size` consecutive tokens, so one request's whole KV cache is one
contiguous byte range per run of consecutive block ids: what the KV transfer moves, in few messages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shared.engine.blocks import runs
from shared.engine.config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.data = torch.zeros(num_blocks, config.num_layers, 2, block_size, config.num_kv_heads,
                                config.head_dim, dtype=dtype, device=device)
        # Index tensors for `write`, which indexes self.data itself: a compiled graph can update the cache
        # in place only if the op mutates the graph input, not a view of it.
        self._layer_ids = [torch.tensor(layer, device=device) for layer in range(config.num_layers)]
        self._kv_slots = torch.tensor([[0, 1]], device=device)  # [1, 2]: K and V

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return block_size * config.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size())

    @property
    def block_nbytes(self) -> int:
        return self.data[0].numel() * self.data.element_size()

    def write_index(self, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Indices for `write` of tokens at (blocks, offsets) [T]: the same for every layer, so built once."""
        return blocks[:, None], self._kv_slots, offsets[:, None]  # broadcast to [T, 2]

    def write(self, layer: int, index: tuple[torch.Tensor, ...], kv: torch.Tensor) -> None:
        """Store kv [T, 2 (K, V), kv_heads, head_dim] of one layer at the slots of `index` (write_index)."""
        blocks, kv_slots, offsets = index
        self.data.index_put_((blocks, self._layer_ids[layer], kv_slots, offsets), kv)

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of each row's blocks, as [rows, blocks * block_size, kv_heads, head_dim]."""
        rows, nblocks = block_tables.shape
        ids = block_tables.reshape(-1)
        # index_select copies whole blocks; advanced indexing (k[tables]) is ~2x slower on strided storage.
        # Views of self.data are made here rather than kept: a compiled graph then sees one cache tensor.
        k = self.data[:, layer, 0].index_select(0, ids)  # [rows * blocks, block_size, kv_heads, head_dim]
        v = self.data[:, layer, 1].index_select(0, ids)
        shape = (rows, nblocks * self.block_size, *k.shape[2:])
        return k.view(shape), v.view(shape)

    def views(self, block_ids: Sequence[int]) -> list[torch.Tensor]:
        """Contiguous views over the given blocks, one per run of consecutive ids, in order."""
        return [self.data[start:start + length] for start, length in runs(block_ids)]

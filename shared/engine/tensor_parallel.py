"""Tensor parallelism inside one instance: which part of the model each rank holds (Megatron-style).

Attention is split by KV head (each rank keeps whole query groups, so grouped-query attention stays
local) and the MLP by intermediate column. The input projections (qkv, gate/up) are split by output
row, the output projections (o_proj, down_proj) by input column: each rank's output projection gives
a partial sum of the residual update, and one all-reduce per sublayer adds them up
(`DecoderLayer.all_reduce`). Embeddings, norms and the LM head stay whole: every rank holds the
replicated residual stream, and only rank 0 computes logits.

A rank's KV cache holds only its heads. The parts need not be equal: SmolLM2-135M has 3 KV heads, and
at TP2 rank 0 takes 2 of them, rank 1 one (sizes differ by at most one, the larger first).
The processes and the per-step protocol between the ranks are shared/engine/tp_group.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import nn

from shared.engine.config import ModelConfig
from shared.engine.model import DecoderLayer, Transformer


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    def part(self, n: int) -> range:
        """This rank's contiguous share of n items (KV heads, MLP columns)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))


def check_shardable(config: ModelConfig, world: int) -> None:
    """Raise ValueError with a user-facing reason if the model cannot run at tp=world."""
    if world > config.num_kv_heads:
        raise ValueError(f"tp={world} exceeds the model's {config.num_kv_heads} KV heads: every rank needs one")
    if world > config.intermediate_size:
        raise ValueError(f"tp={world} exceeds the model's MLP width of {config.intermediate_size}")


def shard_config(config: ModelConfig, shard: Shard) -> ModelConfig:
    """The shape one rank computes: its heads and MLP columns."""
    kv_heads = len(shard.part(config.num_kv_heads))
    group = config.num_heads // config.num_kv_heads
    return replace(config, num_heads=kv_heads * group, num_kv_heads=kv_heads,
                   intermediate_size=len(shard.part(config.intermediate_size)))


def head_rows(config: ModelConfig, heads: range) -> torch.Tensor:
    """Rows of the fused qkv projection that belong to KV heads `heads` (their query groups, K and V)."""
    d, group = config.head_dim, config.num_heads // config.num_kv_heads
    q = torch.arange(heads.start * group * d, heads.stop * group * d)
    k = config.q_size + torch.arange(heads.start * d, heads.stop * d)
    return torch.cat([q, k, config.kv_size + k])


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: range | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    if cols is not None:
        weight = weight[:, cols.start:cols.stop]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return out


def shard_model_(model: Transformer, shard: Shard, all_reduce: Callable[[torch.Tensor], None]) -> None:
    """Keep only this rank's part of every layer (before any weight conversion: they pack plain Linears).

    `all_reduce` sums a sublayer's partial output over the instance's ranks, in place."""
    full = model.config
    check_shardable(full, shard.world)
    local = shard_config(full, shard)
    heads = shard.part(full.num_kv_heads)
    group_size = full.num_heads // full.num_kv_heads
    q_cols = range(heads.start * group_size * full.head_dim, heads.stop * group_size * full.head_dim)
    columns = shard.part(full.intermediate_size)
    gate_up_rows = torch.cat([torch.arange(columns.start, columns.stop),
                              full.intermediate_size + torch.arange(columns.start, columns.stop)])
    for layer in cast(list[DecoderLayer], model.layers):
        attn, mlp = layer.attn, layer.mlp
        attn.qkv_proj = _sliced(attn.qkv_proj, rows=head_rows(full, heads))
        attn.o_proj = _sliced(attn.o_proj, cols=q_cols)
        attn.config = local
        mlp.gate_up_proj = _sliced(mlp.gate_up_proj, rows=gate_up_rows)
        mlp.down_proj = _sliced(mlp.down_proj, cols=columns)
        layer.all_reduce = all_reduce
    model.computes_logits = shard.rank == 0

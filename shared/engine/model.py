"""A Llama-family decoder in plain torch, reading and writing a paged KV cache.

One forward pass serves any mix of work: prefill chunks (many tokens of one sequence) and decode
tokens (one token of each of many sequences) are flattened into a single [T, hidden] batch, so every
linear layer is one GEMM. Only attention looks at sequence boundaries.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from shared.engine.config import ModelConfig
from shared.engine.kv_cache import KVCache
from shared.engine.native import load_layer_ops, load_paged_attention


@dataclass
class PrefillSpan:
    """Tokens [start, start + length) of the flat batch are positions [cached, cached + length) of one sequence."""

    start: int
    length: int
    num_cached: int  # tokens of this sequence already in the KV cache (prefix or earlier chunks)
    block_table: torch.Tensor  # [num_blocks] int64


@dataclass
class ForwardBatch:
    """Flat inputs for one forward pass. Decode tokens come first, then prefill spans."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_blocks: torch.Tensor  # [T] block id where each token's K/V is written
    slot_offsets: torch.Tensor  # [T] offset inside that block
    num_decode: int  # the first num_decode tokens are decode tokens, one per sequence
    decode_block_tables: torch.Tensor  # [num_decode, max_blocks] int64 (padded with 0)
    decode_context_lens: torch.Tensor  # [num_decode] int64, including the new token
    prefill_spans: list[PrefillSpan]
    logits_indices: torch.Tensor  # [num_sequences] rows of the flat batch whose logits are needed

    def to(self, device: torch.device) -> ForwardBatch:
        """The batch on the model's device (built on the host by ModelRunner.prepare)."""
        if device.type == "cpu":
            return self

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        spans = [PrefillSpan(s.start, s.length, s.num_cached, move(s.block_table)) for s in self.prefill_spans]
        return ForwardBatch(move(self.token_ids), move(self.positions), move(self.slot_blocks),
                            move(self.slot_offsets), self.num_decode, move(self.decode_block_tables),
                            move(self.decode_context_lens), spans, move(self.logits_indices))


# q [B, H, D], cache, layer, block_tables [B, N], context_lens [B], scale -> [B, H, D]
PagedAttention = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor, float], torch.Tensor]
# q [T, H, D], k, v [T, KVH, D], starts [S + 1], scale, longest prompt -> [T, H, D]: causal, each prompt to itself
PackedPrefillAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, int], torch.Tensor]


# Who computes RMSNorm, RoPE and the K/V store: torch's ops; C++ (csrc/layer_ops.cpp, for eager float32 steps on
# CPU: Transformer.use_native_layer_ops); Triton (shared/engine/gpu/, on a GPU: Transformer.use_triton_layer_ops).
LayerOps = Literal["torch", "native", "triton"]


def native_layer_ops(ops: LayerOps, x: torch.Tensor) -> bool:
    """Whether an op runs in csrc/layer_ops.cpp: in eager float32 steps of a model that loaded them
    (Transformer.use_native_layer_ops). A compiled graph keeps torch's ops, which inductor fuses itself."""
    return ops == "native" and x.dtype == torch.float32 and not torch.compiler.is_compiling()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops: LayerOps = "torch"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """rms_norm(x) * weight; with `residual`, first residual += x (in place) and the norm of that."""
        if self.ops == "triton":  # the add and the norm in one pass over each row
            from shared.engine.gpu.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            residual += x
            x = residual
        if native_layer_ops(self.ops, x) and x.dim() == 2 and self.weight.dtype == torch.float32:
            return torch.ops.distserve.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (the Hugging Face convention; GGUF q/k rows are un-permuted at load)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)  # [P, D/2]
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], dim=-1).float(), persistent=False)
        # rotate_half(x) * sin == swap_halves(x) * [-sin, sin]: the sign lives in the table.
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], dim=-1).float(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions, None, :].to(dtype), self.sin[positions, None, :].to(dtype)  # [T, 1, D]


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ops: LayerOps = "torch") -> None:
    """RoPE in place on x [T, heads, D]; sin comes signed from RotaryEmbedding.tables."""
    if ops == "triton":
        from shared.engine.gpu.rope import rope_

        rope_(x, cos, sin)
        return
    if native_layer_ops(ops, x):
        torch.ops.distserve.rope_(x, cos, sin)
        return
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    x.mul_(cos).addcmul_(swapped, sin)


@dataclass
class StepTensors:
    """What every layer needs and that depends only on the batch: built once per forward, not per layer."""

    cos: torch.Tensor  # [T, 1, D]
    sin: torch.Tensor  # [T, 1, D], signed
    write_index: tuple[torch.Tensor, ...]  # KVCache.write_index of the batch's slots
    decode_block_tables: torch.Tensor  # [B, N]: B = the number of decode tokens, first in the batch
    decode_context_lens: torch.Tensor  # [B]
    decode_mask: torch.Tensor | None  # [B, 1, 1, N * block_size] bool: key positions within each context (gather)
    paged: PagedAttention | None  # decode attention straight from the cache (else gather + SDPA)
    layer_ops: LayerOps  # who computes RoPE and the K/V store (RMSNorm: each module's `ops`)
    slots: torch.Tensor | None  # [T] block * block_size + offset of each token's K/V: the Triton store's index
    prefill_spans: list[PrefillSpan]
    # Every span a fresh prompt and a kernel for them (on a GPU): one call for all of them, over the rows from
    # the first span on, which start at prefill_starts (relative to it; the end last); else SDPA per span.
    packed_prefill: PackedPrefillAttention | None = None
    prefill_starts: torch.Tensor | None = None
    prefill_longest: int = 0


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.config = config
        self.layer_id = layer_id
        self.qkv_proj = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, step: StepTensors, cache: KVCache) -> torch.Tensor:
        c = self.config
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 * KVH) * D]
        apply_rope_(qkv[:, : c.q_size + c.kv_size].view(T, c.num_heads + c.num_kv_heads, c.head_dim),
                    step.cos, step.sin, step.layer_ops)  # q and k together
        kv = qkv[:, c.q_size:].view(T, 2, c.num_kv_heads, c.head_dim)
        if step.slots is not None:
            from shared.engine.gpu.prefill_attention import store_kv

            store_kv(kv[:, 0], kv[:, 1], cache.data, self.layer_id, step.slots)
        else:
            cache.write(self.layer_id, step.write_index, kv)
        q = qkv[:, : c.q_size].view(T, c.num_heads, c.head_dim)

        num_decode = step.decode_block_tables.shape[0]
        if not step.prefill_spans:  # decode only: no copy into a shared output
            out = self._decode_attention(q, step, cache)
        else:
            k = qkv[:, c.q_size: c.q_size + c.kv_size].view(T, c.num_kv_heads, c.head_dim)
            v = qkv[:, c.q_size + c.kv_size:].view(T, c.num_kv_heads, c.head_dim)
            out = torch.empty_like(q)
            if num_decode:
                out[:num_decode] = self._decode_attention(q[:num_decode], step, cache)
            if step.packed_prefill is not None:
                assert step.prefill_starts is not None
                rows = slice(step.prefill_spans[0].start, T)
                out[rows] = step.packed_prefill(q[rows], k[rows], v[rows], step.prefill_starts, c.head_dim ** -0.5,
                                                step.prefill_longest)
            else:
                for span in step.prefill_spans:
                    rows = slice(span.start, span.start + span.length)
                    out[rows] = self._prefill_attention(q[rows], k[rows], v[rows], span, cache)
        return self.o_proj(out.view(T, c.q_size))

    def _decode_attention(self, q: torch.Tensor, step: StepTensors, cache: KVCache) -> torch.Tensor:
        if step.paged is not None:
            return step.paged(q, cache.data, self.layer_id, step.decode_block_tables, step.decode_context_lens,
                              self.config.head_dim ** -0.5)
        # Query heads sharing a KV head are laid out as the "query length" axis, so grouped-query
        # attention needs no repeat of K/V: [B, KVH, G, D] x [B, KVH, S, D].
        c = self.config
        B = q.shape[0]
        k, v = cache.gather(self.layer_id, step.decode_block_tables)  # [B, S, KVH, D]
        qg = q.view(B, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim)
        out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=step.decode_mask)
        return out.reshape(B, c.num_heads, c.head_dim)

    def _prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: PrefillSpan,
                           cache: KVCache) -> torch.Tensor:
        n = span.length
        if span.num_cached == 0:
            # Fresh prompt: attend to the keys just computed (they are also in the cache now).
            mask = None
            causal = True
        else:
            # A later chunk, or a cached prefix: attend to everything in the cache up to this token.
            total = span.num_cached + n
            k, v = cache.gather(self.layer_id, span.block_table[None, :])
            k, v = k[0, :total], v[0, :total]
            keys, queries = torch.arange(total, device=q.device), torch.arange(n, device=q.device)
            mask = keys[None, :] <= (span.num_cached + queries)[:, None]  # [n, total]
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=mask, is_causal=causal, enable_gqa=True,
        )  # [1, H, n, D]
        return out[0].transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_id)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        # Tensor parallelism (shared/engine/tensor_parallel.py): attn and mlp give partial sums, which this
        # adds up over the instance's ranks in place. None: one rank.
        self.all_reduce: Callable[[torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor, step: StepTensors, cache: KVCache) -> torch.Tensor:
        # In place: x is this forward's own. post_attn_norm adds the attention's output into x before its norm.
        attended = self._reduced(self.attn(self.input_norm(x), step, cache))
        x += self._reduced(self.mlp(self.post_attn_norm(attended, residual=x)))
        return x

    def _reduced(self, partial: torch.Tensor) -> torch.Tensor:
        if self.all_reduce is not None:
            self.all_reduce(partial)
        return partial


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.paged_attention: PagedAttention | None = None  # set by use_paged_attention()
        self.packed_prefill: PackedPrefillAttention | None = None  # set by use_packed_prefill()
        self.layer_ops: LayerOps = "torch"  # set by use_native_layer_ops() or use_triton_layer_ops()
        self.computes_logits = True  # False on the tensor-parallel ranks other than 0: only rank 0 samples

    def use_native_layer_ops(self) -> None:
        """RMSNorm and RoPE of eager float32 steps by csrc/layer_ops.cpp (native.py builds it)."""
        load_layer_ops()
        self._use_layer_ops("native")

    def use_triton_layer_ops(self) -> None:
        """RMSNorm (fused with the residual add before it), RoPE and the K/V store by Triton kernels (on a GPU):
        one kernel each where torch runs two to four."""
        self._use_layer_ops("triton")

    def _use_layer_ops(self, ops: LayerOps) -> None:
        self.layer_ops = ops
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.ops = ops

    def use_paged_attention(self, device: torch.device) -> None:
        """Decode attention by a kernel that reads the paged cache in place: C++ on CPU (native.py builds it),
        Triton on a GPU."""
        if device.type == "cuda":
            from shared.engine.gpu.paged_attention import paged_decode_attention

            self.paged_attention = paged_decode_attention
            return
        load_paged_attention()
        self.paged_attention = torch.ops.distserve.paged_decode_attention

    def use_packed_prefill(self) -> None:
        """Fresh prompts' attention by one Triton kernel call over all of them (on a GPU; prompts with KV
        already cached, chunks and prefixes, keep SDPA)."""
        from shared.engine.gpu.prefill_attention import prefill_attention

        # 64 x 64 tiles: what flash-attention kernels use at head_dim 64-128 (the tests' default is 16 x 16,
        # for the interpreter); not yet tuned on a GPU.
        self.packed_prefill = functools.partial(prefill_attention, block_m=64, block_n=64)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Logits [num_sequences, vocab] for the rows in batch.logits_indices."""
        if not batch.prefill_spans:
            logits = self.decode(batch.token_ids, batch.positions, batch.slot_blocks, batch.slot_offsets,
                                 batch.decode_block_tables, batch.decode_context_lens, cache)
            # A one-token prompt chunk rides with the decodes but may need no logits.
            if not self.computes_logits or len(batch.logits_indices) == len(logits):
                return logits
            return logits[batch.logits_indices]
        x = self.embed_tokens(batch.token_ids)
        n = batch.num_decode
        step = self._step_tensors(x.dtype, batch.positions, batch.slot_blocks, batch.slot_offsets,
                                  batch.decode_block_tables[:n], batch.decode_context_lens[:n], batch.prefill_spans,
                                  cache)
        for layer in self.layers:
            x = layer(x, step, cache)
        if not self.computes_logits:
            return x.new_empty(0)
        # Only the last token of each sequence needs logits: skip the vocab GEMM for the rest.
        x = self.norm(x[batch.logits_indices])
        return self.lm_head(x).float()

    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor, slot_blocks: torch.Tensor,
               slot_offsets: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
               cache: KVCache) -> torch.Tensor:
        """Logits [B, vocab] of a decode-only step, one new token per sequence (under inference mode). Tensors
        in, tensors out, so that torch.compile can take it whole (shared/engine/compiled.py)."""
        x = self.embed_tokens(token_ids)  # [B, hidden]
        step = self._step_tensors(x.dtype, positions, slot_blocks, slot_offsets, block_tables, context_lens, [],
                                  cache)
        for layer in self.layers:
            x = layer(x, step, cache)
        if not self.computes_logits:
            return x.new_empty(0)
        return self.lm_head(self.norm(x)).float()

    def _step_tensors(self, dtype: torch.dtype, positions: torch.Tensor, slot_blocks: torch.Tensor,
                      slot_offsets: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                      spans: list[PrefillSpan], cache: KVCache) -> StepTensors:
        cos, sin = self.rotary.tables(positions, dtype)
        mask = None
        if block_tables.shape[0] and self.paged_attention is None:
            keys = torch.arange(block_tables.shape[1] * cache.block_size, device=block_tables.device)  # [S]
            mask = (keys < context_lens[:, None])[:, None, None, :]  # [B, 1, 1, S]
        slots = slot_blocks * cache.block_size + slot_offsets if self.layer_ops == "triton" else None
        step = StepTensors(cos, sin, cache.write_index(slot_blocks, slot_offsets), block_tables, context_lens, mask,
                           self.paged_attention, self.layer_ops, slots, spans)
        if self.packed_prefill is not None and spans and all(span.num_cached == 0 for span in spans):
            first = spans[0].start
            ends = [span.start - first for span in spans] + [spans[-1].start + spans[-1].length - first]
            step.packed_prefill = self.packed_prefill
            step.prefill_starts = torch.tensor(ends, device=positions.device)
            step.prefill_longest = max(span.length for span in spans)
        return step

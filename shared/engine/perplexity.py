"""Perplexity and greedy predictions of a model on a fixed text: the quality guard of the reduced-precision weights.

The text runs as chunked prefill of at most `chunk` tokens over the paged KV cache, so every linear layer
sees the row counts of decode steps and takes the same kernel path as decode does (a quantized kernel
handles each row on its own: its numbers do not depend on the batch). The reference text is fixed: the
first HumanEval problems with their canonical solutions, from the packaged dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from shared.engine.kv_cache import KVCache
from shared.engine.model import ForwardBatch, PrefillSpan, Transformer
from shared.tokenizer import Tokenizer

BLOCK_SIZE = 16


def reference_text(problems: int = 8) -> str:
    """The first `problems` HumanEval problems, each its prompt followed by its canonical solution."""
    from shared.workloads import humaneval_problems

    return "\n\n".join(prompt + solution for prompt, solution in humaneval_problems()[:problems])


def reference_tokens(tokenizer: Tokenizer, max_tokens: int = 1024) -> list[int]:
    return tokenizer.encode(reference_text())[:max_tokens]


@dataclass(frozen=True)
class Score:
    perplexity: float  # exp(mean negative log-likelihood) of tokens[1:] given the tokens before each
    predictions: list[int]  # the greedy (top-1) next token at each position

    def agreement(self, reference: Score) -> float:
        """Share of positions where the greedy next token is the reference's."""
        same = sum(a == b for a, b in zip(self.predictions, reference.predictions, strict=True))
        return same / len(self.predictions)


@torch.inference_mode()
def score(model: Transformer, tokens: list[int], kv_dtype: torch.dtype, chunk: int = 32) -> Score:
    """The model's perplexity on `tokens` and its greedy prediction at each position."""
    if len(tokens) < 2:
        raise ValueError("perplexity needs at least two tokens")
    blocks = -(-len(tokens) // BLOCK_SIZE)
    device = model.embed_tokens.weight.device
    cache = KVCache(model.config, blocks, BLOCK_SIZE, kv_dtype, device)
    table = torch.arange(blocks)
    nll, predictions = 0.0, []
    for start in range(0, len(tokens) - 1, chunk):
        ids = tokens[start: min(start + chunk, len(tokens) - 1)]
        n = len(ids)
        pos = torch.arange(start, start + n)
        batch = ForwardBatch(
            token_ids=torch.tensor(ids), positions=pos, slot_blocks=table[pos // BLOCK_SIZE],
            slot_offsets=pos % BLOCK_SIZE, num_decode=0, decode_block_tables=torch.zeros(0, blocks, dtype=torch.long),
            decode_context_lens=torch.zeros(0, dtype=torch.long), prefill_spans=[PrefillSpan(0, n, start, table)],
            logits_indices=torch.arange(n),
        )
        logits = model(batch.to(device), cache).float()
        targets = torch.tensor(tokens[start + 1: start + 1 + n], device=device)
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        predictions += logits.max(dim=-1).indices.tolist()
    return Score(math.exp(nll / (len(tokens) - 1)), predictions)

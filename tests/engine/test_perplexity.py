"""The quality guard's scorer: chunked prefill over the paged cache scores a text as one forward pass does."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from shared.engine.kv_cache import KVCache
from shared.engine.loader import load_model
from shared.engine.model import ForwardBatch, PrefillSpan
from shared.engine.perplexity import BLOCK_SIZE, reference_text, score

TINY = ('random:{"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_layers": 2, "num_heads": 4, '
        '"num_kv_heads": 2, "head_dim": 16}')


def test_chunks_score_as_one_pass() -> None:
    model = load_model(TINY)
    tokens = torch.randint(0, 97, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    whole = score(model, tokens, torch.float32, chunk=1000)
    for chunk in (1, 7, 32):  # one-token chunks are decode-shaped rows
        part = score(model, tokens, torch.float32, chunk=chunk)
        assert part.predictions == whole.predictions
        assert math.isclose(part.perplexity, whole.perplexity, rel_tol=1e-5)
    assert whole.agreement(whole) == 1.0


def test_perplexity_is_the_mean_negative_log_likelihood() -> None:
    model = load_model(TINY)
    tokens = [5, 9, 2, 40, 3]
    s = score(model, tokens, torch.float32)
    # Each prefix scored alone: the logits of its last position predict the next token.
    nll = 0.0
    for i in range(1, len(tokens)):
        logits = score_logits(model, tokens[:i])
        nll += F.cross_entropy(logits[None], torch.tensor([tokens[i]])).item()
    assert math.isclose(s.perplexity, math.exp(nll / (len(tokens) - 1)), rel_tol=1e-5)
    with pytest.raises(ValueError, match="two tokens"):
        score(model, tokens[:1], torch.float32)


def score_logits(model: torch.nn.Module, prefix: list[int]) -> torch.Tensor:
    """Logits after `prefix`, via a one-position text: the scorer's prediction for the token after it."""
    n = len(prefix)
    table = torch.arange(-(-n // BLOCK_SIZE))
    cache = KVCache(model.config, len(table), BLOCK_SIZE, torch.float32)  # type: ignore[arg-type]
    pos = torch.arange(n)
    batch = ForwardBatch(torch.tensor(prefix), pos, table[pos // BLOCK_SIZE], pos % BLOCK_SIZE, 0,
                         torch.zeros(0, len(table), dtype=torch.long), torch.zeros(0, dtype=torch.long),
                         [PrefillSpan(0, n, 0, table)], torch.tensor([n - 1]))
    with torch.inference_mode():
        return model(batch, cache)[0]


def test_the_reference_text_is_fixed() -> None:
    text = reference_text()
    assert text.startswith("from typing import List") and text.count("def ") >= 8

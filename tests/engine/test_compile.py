"""Compiled decode steps (EngineConfig.compile) give the same tokens as eager ones."""

from __future__ import annotations

import json

from shared.engine import EngineConfig, LLMEngine, SamplingParams

# One layer and small shapes: compiling is most of this test's time.
TINY = "random:" + json.dumps(dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                                   num_kv_heads=2, head_dim=16, max_position_embeddings=128))
# (step, request id, prompt length, max_tokens): sequences join a running batch and leave it at different steps.
ARRIVALS = [(0, "a", 9, 14), (0, "b", 3, 6), (2, "c", 21, 9), (5, "d", 6, 12), (5, "e", 13, 3), (11, "f", 30, 5)]


def run(engine: LLMEngine) -> list[list[tuple[str, int]]]:
    """(request id, token) of every step, arrivals as in ARRIVALS."""
    steps: list[list[tuple[str, int]]] = []
    for step in range(60):
        for when, rid, n, max_tokens in ARRIVALS:
            if when == step:
                prompt = [(7 * i + len(rid) + ord(rid)) % 250 + 3 for i in range(n)]
                engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        steps.append([(out.request_id, out.token_id) for out in engine.step()])
    assert not engine.has_unfinished()
    return steps


def test_compiled_decode_matches_eager_token_for_token() -> None:
    config = EngineConfig(model=TINY, weights="fp16", block_size=4, max_num_seqs=4, kv_cache_memory_gib=0.01)
    eager = run(LLMEngine(config))
    engine = LLMEngine(EngineConfig(**{**config.__dict__, "compile": True}))
    assert run(engine) == eager
    assert engine.compiled is not None
    assert engine.compiled.num_eager == 0  # no step fell back for want of a graph
    assert engine.compiled.num_compiled >= 10  # the decode-only steps, at batch 1 and above

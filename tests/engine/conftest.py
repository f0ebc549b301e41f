"""Shared fixtures for engine tests: the default model is loaded once per session."""

from __future__ import annotations

import pytest
import torch

from shared.engine import EngineConfig, LLMEngine


@pytest.fixture(scope="session")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(kv_cache_memory_gib=0.25, weights="native"))  # exact fp32: the reference


def make_engine(**overrides: object) -> LLMEngine:
    return LLMEngine(EngineConfig(**{"kv_cache_memory_gib": 0.25, "weights": "native", **overrides}))  # type: ignore[arg-type]


def run_to_completion(engine: LLMEngine) -> dict[str, list[int]]:
    """Step until idle; the generated token ids of each request."""
    tokens: dict[str, list[int]] = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            return tokens
        for out in engine.step():
            tokens.setdefault(out.request_id, []).append(out.token_id)
    raise AssertionError("engine did not finish")


def move_kv(prefill: LLMEngine, decode: LLMEngine, request_id: str) -> None:
    """Export, import and commit one request's KV, copying its bytes across as a transport would."""
    export = prefill.kv_export(request_id)
    dest = decode.kv_import_begin(export.meta)
    assert dest is not None
    stream = torch.cat([v.reshape(-1).view(torch.uint8) for v in export.views])  # each side: one byte stream
    offset = 0
    for view in dest.views:
        flat = view.view(-1).view(torch.uint8)
        flat.copy_(stream[offset:offset + flat.numel()])
        offset += flat.numel()
    assert offset == export.nbytes == export.meta.nbytes
    decode.kv_import_commit(request_id)

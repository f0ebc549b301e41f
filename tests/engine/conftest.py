"""Shared fixtures for engine tests: the default model is loaded once per session."""

from __future__ import annotations

import pytest

from shared.engine import EngineConfig, LLMEngine


@pytest.fixture(scope="session")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(kv_cache_memory_gib=0.25))


def make_engine(**overrides: object) -> LLMEngine:
    return LLMEngine(EngineConfig(**{"kv_cache_memory_gib": 0.25, **overrides}))  # type: ignore[arg-type]


def run_to_completion(engine: LLMEngine) -> dict[str, list[int]]:
    """Step until idle; the generated token ids of each request."""
    tokens: dict[str, list[int]] = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            return tokens
        for out in engine.step():
            tokens.setdefault(out.request_id, []).append(out.token_id)
    raise AssertionError("engine did not finish")

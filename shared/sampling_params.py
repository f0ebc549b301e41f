"""Per-request sampling parameters: validated once where a request enters, then carried as they are.

One definition for the gateway (its OpenAI request bodies take the same constrained fields), the
wire (PrefillRequest, KVMeta) and the engine (which samples with them). Torch-free.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _top_k(v: int) -> int:
    if v == 0 or v < -1:
        raise ValueError("top_k must be -1 (disabled) or >= 1")
    return v


def _non_empty(stops: tuple[str, ...]) -> tuple[str, ...]:
    if any(not s for s in stops):
        raise ValueError("stop strings must be non-empty")
    return stops


# The constrained fields, shared with the gateway's request bodies (services/gateway/schemas.py).
GREEDY_TEMPERATURE = 1e-5
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 is greedy")]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, AfterValidator(_top_k), Field(description="-1 disables; otherwise keep the k most likely")]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class SamplingParams(BaseModel):
    """Per-request sampling, validated on construction (OpenAI semantics: temperature 0 is greedy)."""

    # Unlike the rest of the wire, unknown fields are refused: a sampling option this version does not know
    # must not be silently dropped (the request would be served, differently from what was asked).
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(default=16, ge=1, description="maximum number of tokens to generate")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    seed: Seed | None = None
    stop: Annotated[tuple[str, ...], AfterValidator(_non_empty), Field(max_length=16)] = ()
    stop_token_ids: tuple[int, ...] = Field(default=(), max_length=64)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        # Below GREEDY_TEMPERATURE the distribution is the argmax anyway, and dividing logits by a
        # temperature like 1e-310 overflows them to inf (a fuzzed request crashed the engine so).
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

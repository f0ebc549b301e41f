"""Configuration of the model (its shape) and of the engine (how it runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from pydantic import model_validator

from shared.config import DType, EngineSettings, Role, Weights
from shared.engine.precision import choose

__all__ = ["EngineConfig", "ModelConfig", "Role", "Weights"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2 has biases on q/k/v

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * self.hidden_size) + embed + self.hidden_size

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_bytes


class EngineConfig(EngineSettings):
    """How one engine instance runs: the engine settings (shared/config.py) plus its model and role.

    Validated once on construction, frozen.
    """

    model: str = "default"  # "default" | path to .gguf | Hugging Face dir | "random:<json ModelConfig fields>"
    role: Role = "colocated"
    seed: int = 0  # random-model initialisation
    # Always concrete here: "auto" (the default) resolves for this CPU and role on construction.
    dtype: DType = "float32"
    weights: Weights = "fp16"
    precision_chosen: bool = False  # whether dtype or weights came from shared/engine/precision.py's table
    # The KV transport of a worker that hands KV off (its worker.transport and worker.transfer_host): at tp > 1
    # ranks 1.. offer and pull their own KV heads on one of their own. None: no hand-off (colocated, in process).
    kv_transport: str | None = None
    kv_transfer_host: str = "127.0.0.1"

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        dtype, weights = data.get("dtype", "auto"), data.get("weights", "auto")
        if "auto" not in (dtype, weights):
            return data
        for name, value in (("dtype", dtype), ("weights", weights)):  # a bad value gets the field's message
            if value != "auto":
                EngineSettings.model_validate({name: value})
        chosen = choose(dtype, weights, data.get("role", "colocated"))
        return {**data, "dtype": chosen.dtype, "weights": chosen.weights, "precision_chosen": True}

    @model_validator(mode="after")
    def _chunked_prefill_is_colocated(self) -> Self:
        if self.chunked_prefill and self.role != "colocated":
            raise ValueError("chunked_prefill applies to the colocated role only")
        return self

    @classmethod
    def of(cls, engine: EngineSettings, model: str, role: Role) -> EngineConfig:
        """A worker's engine: its role's settings (a RoleSettings keeps its CPU-sharing knobs to itself)."""
        return cls(model=model, role=role, **{name: getattr(engine, name) for name in EngineSettings.model_fields})

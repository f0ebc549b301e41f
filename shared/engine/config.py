"""Configuration of the model (its shape) and of the engine (how it runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["prefill", "decode", "colocated"]
Weights = Literal["native", "fp16", "int8"]  # linear weights: in the engine's dtype, or fp16 / int8 (quant.py)


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


@dataclass(frozen=True)
class EngineConfig:
    """How one engine instance runs. Validated once, never mutated."""

    model: str = "default"  # "default" | path to .gguf | Hugging Face dir | "random:<json ModelConfig fields>"
    role: Role = "colocated"
    max_num_batched_tokens: int = 2048  # prefill token budget per step (DistServe's L_m)
    max_num_seqs: int = 64  # cap on sequences in one decode batch
    block_size: int = 16
    kv_cache_memory_gib: float = 1.0
    max_model_len: int | None = None  # default: the model's context length
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's default (all cores)
    chunked_prefill: bool = False  # colocated only: Sarathi-style prefill chunks mixed with decodes
    dtype: Literal["float32", "bfloat16"] = "float32"
    weights: Weights = "native"  # linear layers: in `dtype`, or fp16 / int8 weights (quant.py; float32 only)
    seed: int = 0  # random-model initialisation
    compile: bool = False  # decode-only steps as one torch.compile graph (compiled.py); compiles at start
    paged_attention: bool = True  # decode attention by a C++ kernel over the paged cache (else gather + SDPA)
    pack_bf16: bool = True  # bfloat16 linear weights reordered once for oneDNN, where the CPU has its kernels

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "colocated"):
            raise ValueError(f"role must be prefill, decode or colocated, not {self.role!r}")
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError("kv_cache_memory_gib must be > 0")
        if self.weights not in ("native", "fp16", "int8"):
            raise ValueError(f"weights must be native, fp16 or int8, not {self.weights!r}")
        if self.weights != "native" and self.dtype != "float32":
            raise ValueError(f"weights={self.weights} runs with float32 activations (dtype float32)")
        if self.chunked_prefill and self.role != "colocated":
            raise ValueError("chunked_prefill applies to the colocated role only")

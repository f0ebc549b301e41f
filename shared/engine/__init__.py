"""The inference engine: one API for the prefill, decode and colocated roles (docs/engine-api.md).

`LLMEngine` (torch) is imported on first use: the emulated engine's workers never load torch.
"""

from typing import TYPE_CHECKING, Any

from shared.engine.api import Engine, EngineStats, KVExport, StepOutput, StepRecord
from shared.engine.config import EngineConfig, ModelConfig, Role
from shared.protocol import KVMeta
from shared.sampling_params import SamplingParams

if TYPE_CHECKING:
    from shared.engine.engine import LLMEngine

__all__ = [
    "Engine", "EngineConfig", "EngineStats", "KVExport", "KVMeta", "LLMEngine", "ModelConfig", "Role",
    "SamplingParams", "StepOutput", "StepRecord",
]


def __getattr__(name: str) -> Any:
    if name == "LLMEngine":
        from shared.engine.engine import LLMEngine

        return LLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The inference engine: one API for the prefill, decode and colocated roles (docs/engine-api.md)."""

from shared.engine.config import EngineConfig, ModelConfig, Role
from shared.engine.engine import EngineStats, KVExport, LLMEngine, StepOutput, StepRecord
from shared.protocol import KVMeta
from shared.sampling_params import SamplingParams

__all__ = [
    "EngineConfig", "EngineStats", "KVExport", "KVMeta", "LLMEngine", "ModelConfig", "Role",
    "SamplingParams", "StepOutput", "StepRecord",
]

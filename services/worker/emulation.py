"""The emulated GPU engine of a worker (`engine: emulated`): its step times, KV memory and link from the
planner's latency profiles, so that the stack serves what the simulator simulates.

The profile: `reference` (the published A100 measurements: DistServe's for prefill and decode
instances, vLLM's for the colocated baseline, as the planner's plans assume), `roofline`, or a file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.planner.args import profiles_for
from services.planner.latency import StepProfile
from shared.config import Settings
from shared.engine.config import EngineConfig
from shared.engine.emulated import EmulatedEngine, EmulatedGPU
from shared.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileStepTimes:
    """`StepTimes` from a latency profile at one TP, over `pp` stages."""

    step: StepProfile
    pp: int

    def prefill(self, lengths: list[int]) -> float:
        return self.step.prefill_time(sum(lengths), sum(n * n for n in lengths))

    def decode(self, batch: int, context: int) -> float:
        return self.step.decode_round(batch, context, self.pp)


def emulated_gpu(config: EngineConfig, settings: Settings) -> EmulatedGPU:
    emulation = settings.emulation
    disaggregated, colocated = profiles_for(settings.model, emulation.gpu, emulation.profile)
    latency = colocated if config.role == "colocated" else disaggregated
    if not latency.allows(config.tp, config.pp):
        raise ValueError(f"the {emulation.profile} profile of {latency.model} on {latency.hardware} has no "
                         f"tp={config.tp}, pp={config.pp} (TP degrees {latency.tp_degrees})")
    return EmulatedGPU(
        label=f"emulated-{emulation.gpu}", model_name=latency.model,
        times=ProfileStepTimes(latency.step(config.tp), config.pp), pp=config.pp,
        kv_capacity_tokens=latency.kv_capacity(config.tp, config.pp), kv_bytes_per_token=latency.kv_bytes_per_token,
        kv_fraction=emulation.kv_fraction, link_bytes_per_s=emulation.link_gbps * 1e9 / 8,
    )


def emulated_engine(config: EngineConfig, settings: Settings) -> EmulatedEngine:
    gpu = emulated_gpu(config, settings)
    log.warning("%s: EMULATED engine (no model runs), %s profile, TP%d x PP%d: %s", config.role,
                settings.emulation.profile, config.tp, config.pp, gpu.description)
    return EmulatedEngine(config, gpu, load_tokenizer(settings.tokenizer_model))

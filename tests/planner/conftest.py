"""A toy latency model with round coefficients, so expected times can be written by hand."""

from __future__ import annotations

import pytest

from services.planner.latency import Coeffs, LatencyModel, StepProfile


def toy_model(tps: tuple[int, ...] = (1, 2), capacity: dict[tuple[int, int], int] | None = None,
              max_pp: int | None = None) -> LatencyModel:
    """Step times in ms: prefill 20 + 0.1*sum(l) + 1e-5*sum(l^2), decode 10 + 0.001*sum(ctx) + 0.2*batch,
    each divided by tp (an ideal speedup); KV capacity 4000 tokens per GPU unless ``capacity`` says."""
    steps = {tp: StepProfile(Coeffs(20 / tp, 0.1 / tp, 1e-5 / tp), Coeffs(10 / tp, 0.001 / tp, 0.2 / tp),
                             Coeffs(10 / tp, 0.001 / tp, 0.2 / tp)) for tp in tps}
    return LatencyModel(model="toy", hardware="test", source="test", steps=steps, kv_bytes_per_token=1000,
                        usable_bytes_per_gpu=5_000_000.0, weight_bytes=1_000_000.0,
                        capacity_table=capacity or {}, max_pp=max_pp)


@pytest.fixture
def toy() -> LatencyModel:
    return toy_model()

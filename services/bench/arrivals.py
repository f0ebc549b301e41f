"""Open-loop arrival schedules: when each request is sent, relative to the start of a run.

Inter-arrival gaps are gamma distributed with mean 1/rate and shape k (vLLM's "burstiness"):
k = 1 is a Poisson process, k < 1 is burstier, k > 1 more regular; "constant" spaces requests
exactly 1/rate apart. The first request goes at t = 0. For one seed, a schedule at rate r is the
same draw divided by r, so a rate sweep replays one arrival pattern at different speeds.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

ArrivalProcess = Literal["poisson", "gamma", "constant"]
ARRIVAL_PROCESSES: tuple[ArrivalProcess, ...] = ("poisson", "gamma", "constant")


def arrival_times(
    num_requests: int,
    rate: float,
    *,
    seed: int = 0,
    process: ArrivalProcess = "poisson",
    burstiness: float = 1.0,
) -> list[float]:
    """Send times in seconds, non-decreasing, starting at 0. ``rate=inf`` sends everything at once."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not rate > 0:
        raise ValueError(f"rate must be positive (requests/s), got {rate}")
    if process not in ARRIVAL_PROCESSES:
        raise ValueError(f"unknown arrival process {process!r}; expected one of {ARRIVAL_PROCESSES}")
    if process == "gamma" and not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness (gamma shape) must be positive and finite, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * num_requests
    gaps = num_requests - 1
    if process == "constant":
        unit = np.ones(gaps)
    else:
        shape = 1.0 if process == "poisson" else burstiness
        unit = np.random.default_rng(seed).gamma(shape, 1.0 / shape, size=gaps)  # mean 1
    return [0.0, *np.cumsum(unit / rate).tolist()]

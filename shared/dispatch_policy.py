"""Where a request goes: the least-loaded instance of a role (DistServe's dispatch).

One policy for the gateway, which dispatches real requests on the load its workers report
(services/gateway/registry.py), and for the simulator, which dispatches simulated requests on the
load its instances keep (services/planner/simulator.py): both decide alike, so the planner predicts
what the stack does.

- prefill: the fewest queued prompt tokens (the work ahead of a new prompt), then the fewest queued
  requests;
- decode: the fewest sequences running or waiting for their KV, then the most free KV blocks;
- colocated: the fewest queued prompt tokens, then the fewest sequences running or waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from shared.config import Role

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Load:
    """What dispatch looks at in an instance."""

    queued_tokens: int = 0  # prompt tokens waiting for prefill, the prompt in progress included
    waiting: int = 0  # requests waiting: for prefill, or (decode) for their KV to be pulled
    running: int = 0  # sequences in the decode batch
    free_blocks: int = 0  # KV memory left, in any unit the instances of one pool share


def score(role: Role, load: Load) -> tuple[int, int]:
    """Lower is less loaded."""
    if role == "prefill":
        return load.queued_tokens, load.waiting
    if role == "decode":
        return load.running + load.waiting, -load.free_blocks
    return load.queued_tokens, load.running + load.waiting


def least_loaded(role: Role, candidates: Sequence[T], load_of: Callable[[T], Load]) -> T | None:
    """The candidate a new request of this role goes to (the first one among equals); None if there is none."""
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    return min(candidates, key=lambda c: score(role, load_of(c)))

"""GPU placement for a stack on one machine: which GPUs each worker gets (`distserve up`).

A worker computing on CUDA uses GPUs 0..tp-1 of what it sees (shared/engine/device.py), so two workers
on one machine would share GPU 0 unless each sees only its own: `up` gives each GPU worker its GPUs
through CUDA_VISIBLE_DEVICES, tp of them, none shared. Found without torch (the launcher never loads it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

DRIVER_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU the NVIDIA driver manages


def visible_gpus() -> list[int]:
    """The GPU indices CUDA shows this process: CUDA_VISIBLE_DEVICES where set (its numeric entries),
    else one per GPU the NVIDIA driver lists; [] without a driver."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(entry) for entry in visible.split(",") if entry.strip().isdigit()]
    try:
        return list(range(len(list(DRIVER_GPUS.iterdir()))))
    except OSError:
        return []


def assign_gpus(sizes: list[int], gpus: list[int], taken: Iterable[int] = ()) -> list[list[int]]:
    """Distinct GPUs for instances of `sizes[i]` GPUs each, from `gpus` less `taken`, in order; ValueError
    if there are too few."""
    busy = set(taken)
    free = [gpu for gpu in gpus if gpu not in busy]
    if sum(sizes) > len(free):
        raise ValueError(f"{len(sizes)} GPU worker(s) need {sum(sizes)} GPUs (one per tensor-parallel rank); "
                         f"{len(free)} of the {len(gpus)} visible GPUs are free")
    out, start = [], 0
    for size in sizes:
        out.append(free[start:start + size])
        start += size
    return out

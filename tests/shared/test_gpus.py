"""GPU placement for `distserve up` (shared/gpus.py, services/launcher.py), without GPUs: which GPUs each
worker is given through CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

from pathlib import Path

import pytest

from services import launcher
from services.launcher import Stack
from shared import gpus
from shared.config import load_settings


def test_visible_gpus_follow_cuda_visible_devices_else_the_driver(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpus.visible_gpus() == [2, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    for bus in ("0000:07:00.0", "0000:0a:00.0", "0000:44:00.0"):
        (tmp_path / bus).mkdir()
    monkeypatch.setattr(gpus, "DRIVER_GPUS", tmp_path)
    assert gpus.visible_gpus() == [0, 1, 2]
    monkeypatch.setattr(gpus, "DRIVER_GPUS", tmp_path / "absent")
    assert gpus.visible_gpus() == []


def test_instances_get_distinct_gpus_or_a_clear_error() -> None:
    assert gpus.assign_gpus([2, 1, 1], [0, 1, 2, 3]) == [[0, 1], [2], [3]]
    assert gpus.assign_gpus([2], [0, 1, 2, 3], taken=[0, 2]) == [[1, 3]]
    with pytest.raises(ValueError, match="need 5 GPUs .* 4 of the 4 visible GPUs are free"):
        gpus.assign_gpus([4, 1], [0, 1, 2, 3])


def test_up_gives_each_gpu_worker_its_own_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "visible_gpus", lambda: list(range(8)))
    layout = {"prefill_instances": 2, "prefill": {"tp": 2, "device": "cuda"}, "decode": {"tp": 4}}  # decode: auto
    settings = load_settings({**layout, "decode_instances": 1})
    stack = Stack(settings, announce=False)
    roles = [role for role, _ in launcher.worker_names(settings)]
    assert stack._worker_gpus(roles) == [[0, 1], [2, 3], [4, 5, 6, 7]]
    on_cpu = load_settings({"prefill": {"device": "cpu"}, "decode": {"device": "cpu"}})
    assert Stack(on_cpu, announce=False)._worker_gpus(["prefill", "decode"]) == [None, None]
    emulated = load_settings({"engine": "emulated", "decode": {"tp": 2}})
    assert Stack(emulated, announce=False)._worker_gpus(["prefill", "decode"]) == [None, None]
    with pytest.raises(ValueError, match="4 GPU worker.* need 12 GPUs"):  # 2 x TP2 + 2 x TP4
        Stack(load_settings({**layout, "decode_instances": 2}), announce=False)._worker_gpus([*roles, "decode"])


def test_no_gpu_worker_starts_without_a_free_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "visible_gpus", list)
    stack = Stack(load_settings({"decode": {"device": "cuda"}}), announce=False)
    with pytest.raises(ValueError, match="no NVIDIA GPU is visible"):
        stack._worker_gpus(["prefill", "decode"])
    with pytest.raises(RuntimeError, match="no decode worker started: .* need 1 GPUs"):
        stack.add_worker("decode")
    assert not stack.children

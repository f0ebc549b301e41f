"""CPU pinning (shared/cpus.py): CPU lists, the worker layout, and pinning a real process."""

from __future__ import annotations

import os
import subprocess

import pytest

from shared.config import load_settings
from shared.cpus import assign_worker_cpus, available_cpus, check_cpus, parse_cpu_list, pin_process


def test_cpu_lists_parse_as_taskset_writes_them() -> None:
    assert parse_cpu_list("1") == [1]
    assert parse_cpu_list("0,2-3") == [0, 2, 3]
    assert parse_cpu_list(" 3, 1-2,2 ") == [1, 2, 3]
    for bad in ("", "a", "3-1", "-1", "1,,2", "1-"):
        with pytest.raises(ValueError, match="CPU list"):
            parse_cpu_list(bad)


def test_each_worker_gets_consecutive_cpus_of_its_own() -> None:
    assert assign_worker_cpus([1, 1], [4, 7]) == [[4], [7]]
    assert assign_worker_cpus([2, 1], [0, 1, 2, 3]) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="needs as many CPUs"):
        assign_worker_cpus([2, 1], [0, 1])


def test_unavailable_or_negative_cpus_are_refused() -> None:
    with pytest.raises(ValueError, match="not available"):
        check_cpus([max(available_cpus()) + 1])
    with pytest.raises(ValueError, match="service_cpus"):
        load_settings({"service_cpus": [-1]})
    with pytest.raises(ValueError, match="service_cpus"):
        load_settings({"service_cpus": []})


def test_pinning_a_process_pins_all_its_threads() -> None:
    cpu = available_cpus()[-1]
    # A process with a second thread already running when it is pinned.
    code = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); print(1, flush=True)"
    proc = subprocess.Popen(["python3", "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline()
        pin_process(proc.pid, [cpu])
        tids = os.listdir(f"/proc/{proc.pid}/task")
        assert len(tids) == 2
        assert all(os.sched_getaffinity(int(tid)) == {cpu} for tid in tids)
    finally:
        proc.kill()
        proc.wait()


def test_a_bad_cpu_flag_is_a_usage_error_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["up", "--service-cpus", "3-1"])
    assert exit_info.value.code == 2 and "not a CPU list: '3-1'" in capsys.readouterr().err

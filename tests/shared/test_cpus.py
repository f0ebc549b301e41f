"""CPU placement (shared/cpus.py): CPU lists, the worker layout, pinning and lowering the priority of real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import load_settings
from shared.cpus import (
    assign_worker_cpus,
    autogroup_nice,
    available_cpus,
    check_cpus,
    lower_priority,
    parse_cpu_list,
    pin_process,
)


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


LOWER = """
import os, sys, threading, time
from shared.cpus import autogroup_nice, lower_priority
threading.Thread(target=time.sleep, args=(30,), daemon=True).start()  # a thread that runs already
lower_priority(int(sys.argv[1]))
late = threading.Thread(target=time.sleep, args=(30,), daemon=True)  # one started after: inherits it
late.start()
nice = sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")})
print(len(os.listdir("/proc/self/task")), nice, autogroup_nice(), flush=True)
"""


@pytest.mark.parametrize("own_session", [True, False])
def test_lowering_priority_reaches_every_thread_and_a_session_leaders_autogroup(own_session: bool) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    out = subprocess.run([sys.executable, "-c", LOWER, "7"], capture_output=True, text=True, check=True, timeout=60,
                         start_new_session=own_session, cwd=Path(__file__).parents[2]).stdout.split(maxsplit=1)
    threads, rest = int(out[0]), out[1]
    nice, group = rest.rsplit(maxsplit=1)
    assert threads == 3 and nice == f"[{min(base + 7, 19)}]"
    mine = autogroup_nice()
    if mine is not None and group != "None":  # the kernel shows autogroups: only a session leader moves its own
        assert int(group) == (7 if own_session else mine)
    lower_priority(0)  # nothing to do, nothing done
    assert os.getpriority(os.PRIO_PROCESS, 0) == base


def test_an_autogroup_is_read_where_the_kernel_shows_one(tmp_path: Path) -> None:
    shown = {"/autogroup-626 nice 0\n": 0, "/autogroup-7 nice -3": -3, "": None, "/autogroup-1": None, "x nice y": None}
    for text, expected in shown.items():
        (tmp_path / "autogroup").write_text(text)
        assert autogroup_nice(tmp_path / "autogroup") == expected
    assert autogroup_nice(tmp_path / "missing") is None


def test_a_bad_cpu_flag_is_a_usage_error_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["up", "--service-cpus", "3-1"])
    assert exit_info.value.code == 2 and "not a CPU list: '3-1'" in capsys.readouterr().err

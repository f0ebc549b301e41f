"""CPU placement for a stack on one machine: pinning workers to cores, and lowering a worker's priority.

Why: the gateway, NATS, Redis and any client on the machine wake many times a second and preempt
whichever worker shares their core. On 2 cores, under a chatbot load of 18-24 req/s, a prefill
worker's steps ran 1.4x slower than the same steps alone; pinned alone on its core, with everything
else on the other, 1.02-1.06x (docs/benchmarks.md). On those 2 cores goodput still fell, because the
services then slowed the decode worker instead: pinning is opt-in (`Settings.pin_workers`,
`Settings.service_cpus`), for machines with cores to spare for the services.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path


def available_cpus() -> list[int]:
    """The CPUs this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def parse_cpu_list(text: str) -> list[int]:
    """'0,2-3' -> [0, 2, 3] (the format of taskset and /sys); ValueError for anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        bounds = part.strip().split("-")
        if len(bounds) > 2 or not all(b.isdigit() for b in bounds) or int(bounds[0]) > int(bounds[-1]):
            raise ValueError(f"not a CPU list: {text!r} (expected e.g. 1 or 0,2-3)")
        cpus.update(range(int(bounds[0]), int(bounds[-1]) + 1))
    return sorted(cpus)


def assign_worker_cpus(threads: Sequence[int], cpus: Sequence[int]) -> list[list[int]]:
    """Consecutive CPUs for each worker, as many as its threads; ValueError if they do not fit."""
    if sum(threads) > len(cpus):
        raise ValueError(f"pinning {len(threads)} workers with {sum(threads)} threads in all needs as many CPUs; "
                         f"this process may use {len(cpus)} ({','.join(map(str, cpus))})")
    out, start = [], 0
    for n in threads:
        out.append(list(cpus[start:start + n]))
        start += n
    return out


def check_cpus(cpus: Sequence[int]) -> None:
    unknown = sorted(set(cpus) - set(available_cpus()))
    if unknown:
        raise ValueError(f"CPU(s) {unknown} are not available here (available: {available_cpus()})")


def pin_process(pid: int, cpus: Sequence[int]) -> None:
    """Pin every thread of process ``pid`` (threads it starts later inherit their creator's CPUs)."""
    for _ in range(2):  # a second pass catches a thread started by a not yet pinned one
        with contextlib.suppress(FileNotFoundError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(int(tid), cpus)


def lower_priority(nice: int) -> None:
    """Lower this process's CPU priority by ``nice`` (Linux nice values, 0-19): every thread's and, when
    it leads its session (`up` starts each worker in a session of its own), its autogroup's: with
    autogroups the kernel first shares the CPUs between sessions, then between threads inside each.
    Unprivileged: only ever lowers priority; a worker started by hand leaves its shell's session alone.

    Why: on a machine with fewer cores than workers' threads, the OS shares cores equally. A decode step
    that waits behind a prefill thread stretches every running request's TPOT, while a prefill that waits
    behind short decode steps delays one request's TTFT by a little; lowering prefill's priority gives
    decode the cores first and prefill the rest.
    """
    if nice == 0:
        return
    for tid in os.listdir("/proc/self/task"):  # Linux: a nice value belongs to a thread
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(tid), os.getpriority(os.PRIO_PROCESS, int(tid)) + nice)
    if os.getsid(0) != os.getpid():
        return
    for _ in range(20):  # unprivileged, the kernel allows one autogroup change per 0.1 s machine-wide
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(nice))
            return
        except BlockingIOError:  # EAGAIN: another worker starting at the same moment changed its own
            time.sleep(0.1)
        except OSError:  # no CONFIG_SCHED_AUTOGROUP, or a read-only /proc: thread nice values decide alone
            return


def autogroup_nice(path: Path = Path("/proc/self/autogroup")) -> int | None:
    """This process's autogroup nice value; None where the kernel shows none (no CONFIG_SCHED_AUTOGROUP,
    or a sandboxed /proc whose autogroup file is empty, as on our CI machine)."""
    try:
        words = path.read_text().split()  # e.g. "/autogroup-626 nice 0"
    except OSError:
        return None
    if len(words) != 3 or words[1] != "nice" or not words[2].lstrip("-").isdigit():
        return None
    return int(words[2])


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (stat fields 14, 15)

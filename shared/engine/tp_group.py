"""The processes of a tensor-parallel instance, and what rank 0 tells the others each step.

Rank 0 is the engine its worker drives: the only rank on the control plane. It starts ranks 1..tp-1 as
child processes (`python -m shared.engine.tp_group`), each with the same engine configuration and its own
shard of the model (shared/engine/tensor_parallel.py). From then on the other ranks only follow commands
that rank 0 broadcasts, one at a time:

- `Forward(batch, imports)`: first write the KV of newly imported requests into their blocks (each rank its
  own heads, pulled before), then run this rank's shard of the forward pass; the all-reduces inside it pair
  the ranks up. Only rank 0 computes logits and samples.
- `Offer(request_id, block_ids)`: offer this rank's heads of a prefilled request's KV on its transport.
- `Pull(kv, timeout)`: pull this rank's heads of an imported request's KV, from every prefill rank that has
  some (shared/transfer/heads.py), into a buffer of its own; report when done.
- `Forget(request_id)`: withdraw the offer, or drop the pulled heads, of a request that ended otherwise.
- `None`: exit.

Rank 0 sends a forward pass and an offer itself and waits for them (an offer until every rank has made
it, so that a puller finds it). Pulls and forgets come from the worker's event loop, which must not wait
for a step to end: they go through an outbox that a thread of their own sends between the steps.

So the KV hand-off moves no head through another rank: each rank of a prefill instance offers its heads on
a transport of its own (shared/engine/tp_handoff.py; rank 0 on its worker's), and each rank of a decode
instance pulls the heads it owns, whatever the tp of either side. Ranks report finished pulls to rank 0 on
a pipe each (one JSON line per pull).

The ranks meet through a FileStore in a private directory and talk over gloo bound to 127.0.0.1 (on CPU;
NCCL carries the tensors on GPUs, gloo still the commands). Nothing listens beyond loopback but the KV
transports, which bind the worker's transfer host. A rank whose parent dies exits (`_exit_with_parent`);
rank 0 sees a dead rank as a failed collective, which fails its step and stops the worker, whose supervisor
restarts it whole.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shared.cpus import available_cpus
from shared.engine.config import EngineConfig
from shared.engine.model import ForwardBatch
from shared.engine.model_runner import ModelRunner
from shared.engine.tensor_parallel import Shard
from shared.engine.tp_handoff import RankHandoff, report_to
from shared.protocol import KVHandle
from shared.transfer import TransferError

log = logging.getLogger(__name__)

CONFIG_ENV = "DISTSERVE_TP_ENGINE_CONFIG"  # the engine's configuration, as JSON, for ranks 1..tp-1
START_TIMEOUT_S = 300.0  # every rank joined and loaded its shard (a cold start builds the C++ ops)
SERVE_TIMEOUT = timedelta(days=365)  # a rank waits for its next command as long as rank 0 lives
STOP_WAIT_S = 2.0  # the other ranks to exit once told (then they are killed)
ADDRESS_KEY = "kv-address/"  # + rank: where that rank's KV transport listens, in the store


@dataclass(frozen=True)
class Forward:
    batch: ForwardBatch
    imports: list[tuple[str, list[int]]]  # (request id, block ids) of imported KV each rank writes first


@dataclass(frozen=True)
class Offer:
    request_id: str
    block_ids: list[int]


@dataclass(frozen=True)
class Pull:
    kv: KVHandle
    timeout: float


@dataclass(frozen=True)
class Forget:
    request_id: str


Command = Forward | Offer | Pull | Forget | None


class _Stop:
    """Ends the outbox's thread (not a command: the ranks never see it)."""


class Ranks:
    """One instance's process group: gloo over loopback for commands (and tensors on CPU)."""

    def __init__(self, store_path: Path, rank: int, world: int, device: str) -> None:
        store = dist.FileStore(str(store_path), world)
        self.store = store  # the ranks' KV transport addresses, set before `serving`
        gloo: Any = dist.ProcessGroupGloo  # c10d backends: torch's type stubs lack most of their methods
        options = gloo._Options()
        options._devices = [gloo.create_device(hostname="127.0.0.1")]
        options._timeout = timedelta(seconds=START_TIMEOUT_S)
        self.commands: Any = gloo(dist.PrefixStore("commands", store), rank, world, options)
        self.tensors: Any = self.commands
        if device == "cuda":  # not run yet: no GPU has been lent to this project's sessions
            torch.cuda.set_device(rank)
            nccl: Any = dist.ProcessGroupNCCL
            self.tensors = nccl(dist.PrefixStore("tensors", store), rank, world, nccl.Options())
        self.rank, self.world = rank, world

    def serving(self) -> None:
        """Every rank is ready: from now on a rank waits for its next command as long as it takes."""
        self.commands.barrier().wait()
        self.commands.set_timeout(SERVE_TIMEOUT)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self.tensors.allreduce([tensor]).wait()

    def barrier(self) -> None:
        self.commands.barrier().wait()

    def broadcast(self, command: Command) -> None:
        """Rank 0: send every other rank its next command (pickled: a batch is tensors and small lists)."""
        data = torch.frombuffer(bytearray(pickle.dumps(command)), dtype=torch.uint8)
        self.commands.broadcast(torch.tensor([len(data)]), 0).wait()
        self.commands.broadcast(data, 0).wait()

    def receive(self) -> Command:
        size = torch.zeros(1, dtype=torch.long)
        self.commands.broadcast(size, 0).wait()
        data = torch.empty(int(size), dtype=torch.uint8)
        self.commands.broadcast(data, 0).wait()
        command: Command = pickle.loads(data.numpy().tobytes())
        return command


class TensorParallel:
    """Rank 0's side: starts the other ranks, then runs each forward pass and KV hand-off with them."""

    def __init__(self, config: EngineConfig) -> None:
        self.world = config.tp
        if config.device == "cpu" and config.num_threads is None:  # the ranks share the cores, not each all of them
            config = config.model_copy(update={"num_threads": max(1, len(available_cpus()) // self.world)})
        self._dir = Path(tempfile.mkdtemp(prefix="distserve-tp-"))  # 0700: the store is for these ranks only
        self._processes: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()  # one command at a time, with its collectives
        self._pending_lock = threading.Lock()
        self._pending: list[tuple[str, list[int], torch.Tensor]] = []  # imported KV, written with the next forward
        self._kv_lock = threading.Lock()  # for the two below: engine calls, the step and the report readers use them
        self._pulls: dict[str, _Pulling] = {}  # request id -> the ranks' pulls under way
        self._shared: set[str] = set()  # requests the other ranks hold KV of (offered, or pulled and not written)
        self.ranks: Ranks | None = None
        self.addresses: list[str] = []  # ranks 1..'s KV transports
        self._serving = False  # every rank started: from here on they take commands
        self._outbox: queue.SimpleQueue[Command | _Stop] = queue.SimpleQueue()  # commands no caller waits for
        try:
            store_path = self._dir / "store"
            for rank in range(1, self.world):
                self._start(rank, store_path, config)
            self.ranks = Ranks(store_path, 0, self.world, config.device)
            self.runner = ModelRunner(config, Shard(0, self.world), self.ranks.all_reduce)
            self.ranks.serving()
            self._serving = True
            threading.Thread(target=self._send_commands, daemon=True, name="tp-commands").start()
            if config.kv_transport is not None:  # each rank set its transport's address before `serving`
                self.addresses = [self.ranks.store.get(f"{ADDRESS_KEY}{r}").decode() for r in range(1, self.world)]
        except BaseException as exc:
            self.close()
            if isinstance(exc, ValueError):  # the configuration (a model that cannot split tp ways): as it is
                raise
            exits = [p.returncode for p in self._processes]
            raise RuntimeError(f"tp={self.world}: the ranks did not start (exit codes of ranks 1..: {exits}): "
                               f"{exc}") from exc
        log.info("tensor parallelism: %d ranks (pids %s), KV heads per rank %s", self.world,
                 [os.getpid(), *(p.pid for p in self._processes)], self.head_counts)

    def _start(self, rank: int, store_path: Path, config: EngineConfig) -> None:
        """Start rank `rank`'s process, and a thread that reads the reports it writes on a pipe of its own."""
        report, write_end = os.pipe()
        try:
            self._processes.append(subprocess.Popen(
                [sys.executable, "-m", __name__, "--rank", str(rank), "--world", str(self.world),
                 "--store", str(store_path), "--report-fd", str(write_end)],
                env={**os.environ, CONFIG_ENV: config.model_dump_json()}, pass_fds=(write_end,)))
        except BaseException:
            os.close(report)
            raise
        finally:
            os.close(write_end)
        threading.Thread(target=self._read_reports, args=(rank, report), daemon=True,
                         name=f"tp-rank-{rank}-reports").start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    @property
    def head_counts(self) -> list[int]:
        """KV heads of each rank, in order (KVMeta.shard_heads)."""
        total = self.runner.model_config.num_kv_heads
        return [len(Shard(rank, self.world).part(total)) for rank in range(self.world)]

    def _send_later(self, command: Command) -> None:
        """Send a command once no step holds the ranks, without waiting for it: callers are the worker's
        event loop (an engine call), which must not stall for a step."""
        self._outbox.put(command)

    def _send_commands(self) -> None:
        """The outbox's thread: each command in turn, between the steps."""
        assert self.ranks is not None
        while not isinstance(command := self._outbox.get(), _Stop):
            with self._lock:
                try:
                    self.ranks.broadcast(command)
                except RuntimeError as exc:  # a rank is gone: the next step fails and the worker restarts
                    log.warning("tp command %s not sent: %s", type(command).__name__, exc)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits, as ModelRunner.forward gives them, computed by every rank together."""
        assert self.ranks is not None
        with self._lock:
            with self._pending_lock:
                imports, self._pending = self._pending, []
            self.ranks.broadcast(Forward(batch, [(request_id, block_ids) for request_id, block_ids, _ in imports]))
            for _, block_ids, heads in imports:
                self.runner.commit_staging(heads, block_ids)
            return self.runner.forward(batch)

    # -- the KV hand-off ----------------------------------------------------------------------------------

    def offer(self, request_id: str, block_ids: list[int]) -> list[str]:
        """Ranks 1.. offer their heads of these blocks under the request id; where (their transports).
        Returns once every rank has: a puller may come right after."""
        if not self.addresses:
            raise RuntimeError("this tensor-parallel engine has no KV transport (EngineConfig.kv_transport): "
                               "its ranks cannot offer KV")
        assert self.ranks is not None
        with self._lock:
            self.ranks.broadcast(Offer(request_id, list(block_ids)))
            self.ranks.barrier()
        with self._kv_lock:
            self._shared.add(request_id)
        return self.addresses

    def pull(self, kv: KVHandle, timeout: float) -> Future[int]:
        """Ranks 1.. pull their heads of an imported request's KV; the future is their bytes once every rank
        has them, or a TransferError."""
        if not self.addresses:
            raise RuntimeError("this tensor-parallel engine has no KV transport (EngineConfig.kv_transport): "
                               "its ranks cannot pull KV")
        pulling = _Pulling(set(range(1, self.world)))
        with self._kv_lock:
            self._pulls[kv.transfer_id] = pulling
            self._shared.add(kv.transfer_id)
        self._send_later(Pull(kv, timeout))
        return pulling.future

    def import_later(self, request_id: str, block_ids: list[int], heads: torch.Tensor) -> None:
        """Write an imported request's KV into its blocks (rank 0 `heads`, the others what they pulled) before
        the next forward pass reads them: the request joins a batch only after this, and the ranks may be busy
        with a step now."""
        with self._kv_lock:
            self._shared.discard(request_id)  # the forward command's imports take what they pulled
        with self._pending_lock:
            self._pending.append((request_id, list(block_ids), heads))

    def forget(self, request_id: str) -> None:
        """The request's KV is no longer wanted here: ranks 1.. withdraw its offer or drop its pulled heads."""
        with self._kv_lock:
            pulling = self._pulls.pop(request_id, None)
            shared = request_id in self._shared
            self._shared.discard(request_id)
        if pulling is not None:
            pulling.fail("the import was dropped")
        if shared:
            self._send_later(Forget(request_id))

    def _read_reports(self, rank: int, fd: int) -> None:
        """Rank `rank`'s finished pulls, one JSON line each, until it exits."""
        with os.fdopen(fd, "rb") as lines:
            for line in lines:
                report = json.loads(line)
                with self._kv_lock:
                    pulling = self._pulls.get(report["request_id"])
                    done = pulling is not None and pulling.reported(rank, report["nbytes"], report["error"])
                    if done:
                        del self._pulls[report["request_id"]]
        with self._kv_lock:
            gone, self._pulls = list(self._pulls.values()), {}
        for pulling in gone:
            pulling.fail(f"tp rank {rank} exited")

    def close(self) -> None:
        """Stop the other ranks (a step still under way after half a second, or a start that failed: they
        are killed)."""
        self._outbox.put(_Stop())
        if self._serving and self.ranks is not None and self._lock.acquire(timeout=0.5):
            try:
                self.ranks.broadcast(None)
            except RuntimeError as exc:  # a rank is gone already
                log.debug("tp stop broadcast failed: %s", exc)
            finally:
                self._lock.release()
        deadline = time.monotonic() + STOP_WAIT_S
        for process in self._processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


@dataclass
class _Pulling:
    """Ranks 1..'s pulls of one request, as their reports come in."""

    waiting: set[int]
    future: Future[int] = field(default_factory=Future)
    nbytes: int = 0

    def reported(self, rank: int, nbytes: int, error: str | None) -> bool:
        """Count one rank's report; whether the pull is settled now."""
        if error is not None:
            self.fail(f"tp rank {rank}: {error}")
            return True
        self.waiting.discard(rank)
        self.nbytes += nbytes
        if not self.waiting and not self.future.done():  # done: cancelled by whoever waited
            self.future.set_result(self.nbytes)
        return not self.waiting

    def fail(self, error: str) -> None:
        if not self.future.done():
            self.future.set_exception(TransferError(error))


# -- ranks 1..tp-1 ----------------------------------------------------------------------------------------

def follow(config: EngineConfig, rank: int, world: int, store: Path, report_fd: int) -> None:
    """Serve rank 0's commands until it says stop."""
    ranks = Ranks(store, rank, world, config.device)
    runner = ModelRunner(config, Shard(rank, world), ranks.all_reduce)
    handoff: RankHandoff | None = None
    if config.kv_transport is not None:
        handoff = RankHandoff(runner, config.kv_transport, config.kv_transfer_host, report_to(report_fd))
        ranks.store.set(f"{ADDRESS_KEY}{rank}", handoff.address)
    ranks.serving()
    log.info("tp rank %d/%d ready (pid %d)", rank, world, os.getpid())
    while (command := ranks.receive()) is not None:
        if isinstance(command, Forward):
            for request_id, block_ids in command.imports:
                assert handoff is not None
                runner.commit_staging(handoff.take(request_id), block_ids)
            runner.forward(command.batch)
            continue
        assert handoff is not None, "KV hand-off commands to a rank without a KV transport"
        if isinstance(command, Offer):
            handoff.offer(command.request_id, command.block_ids)
            ranks.barrier()
        elif isinstance(command, Pull):
            handoff.pull(command.kv, command.timeout)
        else:
            handoff.forget(command.request_id)
    if handoff is not None:
        handoff.close()


def _exit_with_parent(parent: int, interval_s: float = 1.0) -> Callable[[], None]:
    """A watchdog: this rank exits once its rank 0 has (it would otherwise wait for commands forever)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)

    return watch


def main() -> None:
    parser = argparse.ArgumentParser(description="A tensor-parallel rank > 0 (started by rank 0's engine).")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--report-fd", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank-{args.rank} %(levelname)s %(message)s")
    threading.Thread(target=_exit_with_parent(os.getppid()), daemon=True).start()
    config = EngineConfig.model_validate_json(os.environ[CONFIG_ENV])
    follow(config, args.rank, args.world, args.store, args.report_fd)


if __name__ == "__main__":
    # Through the module's own name: commands unpickle as shared.engine.tp_group's classes, not __main__'s.
    from shared.engine import tp_group

    tp_group.main()

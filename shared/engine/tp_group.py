"""The processes of a tensor-parallel instance, and what rank 0 tells the others each step.

Rank 0 is the engine its worker drives: the only rank on the control plane and on the KV transport.
It starts ranks 1..tp-1 as child processes (`python -m shared.engine.tp_group`), each with the same
engine configuration and its own shard of the model (shared/engine/tensor_parallel.py). From then on
the other ranks only follow commands that rank 0 broadcasts, one at a time:

- `Forward(batch, imports)`: first write the KV of newly imported requests (rank 0 sends each rank its
  heads of them), then run this rank's shard of the forward pass; the all-reduces inside it pair the
  ranks up. Only rank 0 computes logits and samples.
- `Export(block_ids)`: send this rank's heads of those blocks to rank 0, which joins them.
- `None`: exit.

The KV hand-off therefore always moves the whole model's layout (every KV head of each block), made
by rank 0: a TP2 prefill instance feeds a TP1 decode instance, and the reverse, with no change to the
transport or to the other side. The price is a copy through rank 0's memory at each end. On GPUs,
where each rank would pull its own heads over NVLink, this is the part to replace.

The ranks meet through a FileStore in a private directory and talk over gloo bound to 127.0.0.1 (on CPU;
NCCL carries the tensors on GPUs, gloo still the commands). Nothing listens beyond loopback. A rank
whose parent dies exits (`_exit_with_parent`); rank 0 sees a dead rank as a failed collective, which
fails its step and stops the worker, whose supervisor restarts it whole.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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

log = logging.getLogger(__name__)

CONFIG_ENV = "DISTSERVE_TP_ENGINE_CONFIG"  # the engine's configuration, as JSON, for ranks 1..tp-1
START_TIMEOUT_S = 300.0  # every rank joined and loaded its shard (a cold start builds the C++ ops)
SERVE_TIMEOUT = timedelta(days=365)  # a rank waits for its next command as long as rank 0 lives
STOP_WAIT_S = 2.0  # the other ranks to exit once told (then they are killed)


@dataclass(frozen=True)
class Forward:
    batch: ForwardBatch
    imports: list[list[int]]  # block ids of each imported request whose KV is written first


@dataclass(frozen=True)
class Export:
    block_ids: list[int]


Command = Forward | Export | None


class Ranks:
    """One instance's process group: gloo over loopback for commands (and tensors on CPU)."""

    def __init__(self, store_path: Path, rank: int, world: int, device: str) -> None:
        store = dist.FileStore(str(store_path), world)
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

    def send(self, tensor: torch.Tensor, rank: int) -> None:
        self.tensors.send([tensor.contiguous()], rank, 0).wait()

    def recv(self, tensor: torch.Tensor, rank: int) -> None:
        self.tensors.recv([tensor], rank, 0).wait()

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
    """Rank 0's side: starts the other ranks, then runs each forward pass and KV copy with them."""

    def __init__(self, config: EngineConfig) -> None:
        self.world = config.tp
        if config.device == "cpu" and config.num_threads is None:  # the ranks share the cores, not each all of them
            config = config.model_copy(update={"num_threads": max(1, len(available_cpus()) // self.world)})
        self._dir = Path(tempfile.mkdtemp(prefix="distserve-tp-"))  # 0700: the store is for these ranks only
        self._processes: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()  # one command at a time, with its collectives
        self._pending_lock = threading.Lock()
        self._pending: list[tuple[list[int], torch.Tensor]] = []  # imported KV, written with the next forward
        self.ranks: Ranks | None = None
        self._serving = False  # every rank started: from here on they take commands
        try:
            store = self._dir / "store"
            env = {**os.environ, CONFIG_ENV: config.model_dump_json()}
            for rank in range(1, self.world):
                self._processes.append(subprocess.Popen(
                    [sys.executable, "-m", __name__, "--rank", str(rank), "--world", str(self.world),
                     "--store", str(store)], env=env))
            self.ranks = Ranks(store, 0, self.world, config.device)
            self.runner = ModelRunner(config, Shard(0, self.world), self.ranks.all_reduce)
            self.ranks.serving()
            self._serving = True
        except BaseException as exc:
            self.close()
            if isinstance(exc, ValueError):  # the configuration (a model that cannot split tp ways): as it is
                raise
            exits = [p.returncode for p in self._processes]
            raise RuntimeError(f"tp={self.world}: the ranks did not start (exit codes of ranks 1..: {exits}): "
                               f"{exc}") from exc
        model = self.runner.model_config
        self._heads = [Shard(rank, self.world).part(model.num_kv_heads) for rank in range(self.world)]
        log.info("tensor parallelism: %d ranks (pids %s), KV heads per rank %s", self.world,
                 [os.getpid(), *(p.pid for p in self._processes)], [len(h) for h in self._heads])

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits, as ModelRunner.forward gives them, computed by every rank together."""
        assert self.ranks is not None
        with self._lock:
            with self._pending_lock:
                imports, self._pending = self._pending, []
            self.ranks.broadcast(Forward(batch, [block_ids for block_ids, _ in imports]))
            for block_ids, whole in imports:
                for rank in range(1, self.world):
                    self.ranks.send(self._heads_of(whole, rank), rank)
                self.runner.write_blocks(block_ids, self._heads_of(whole, 0))
            return self.runner.forward(batch)

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        """The blocks' KV with every head, [blocks, layers, 2, block_size, kv_heads, head_dim], in host memory
        (what the transports move): rank 0's heads copied straight from its cache, the others' as received."""
        assert self.ranks is not None
        with self._lock:
            self.ranks.broadcast(Export(block_ids))
            whole = self.runner.kv_staging(len(block_ids), self.runner.cache.data.dtype)
            heads, start = self._heads[0], 0
            for view in self.runner.kv_views(block_ids):  # one view per run of consecutive blocks
                whole[start:start + len(view), ..., heads.start:heads.stop, :].copy_(view)
                start += len(view)
            for rank in range(1, self.world):
                part = self.runner.blocks_buffer(len(block_ids), len(self._heads[rank]))
                self.ranks.recv(part, rank)
                heads = self._heads[rank]
                whole[..., heads.start:heads.stop, :].copy_(part)
            return whole

    def import_later(self, block_ids: list[int], whole: torch.Tensor) -> None:
        """Write imported KV (every head, any dtype) into the blocks before the next forward pass reads
        them: the request joins a batch only after this, and the ranks may be busy with a step now."""
        with self._pending_lock:
            self._pending.append((list(block_ids), whole))

    def _heads_of(self, whole: torch.Tensor, rank: int) -> torch.Tensor:
        heads = self._heads[rank]
        return whole[..., heads.start:heads.stop, :].to(self.runner.device, self.runner.cache.data.dtype)

    def close(self) -> None:
        """Stop the other ranks (a step still under way after half a second, or a start that failed: they
        are killed)."""
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


# -- ranks 1..tp-1 ----------------------------------------------------------------------------------------

def follow(config: EngineConfig, rank: int, world: int, store: Path) -> None:
    """Serve rank 0's commands until it says stop."""
    ranks = Ranks(store, rank, world, config.device)
    runner = ModelRunner(config, Shard(rank, world), ranks.all_reduce)
    ranks.serving()
    log.info("tp rank %d/%d ready (pid %d)", rank, world, os.getpid())
    while (command := ranks.receive()) is not None:
        if isinstance(command, Forward):
            for block_ids in command.imports:
                kv = runner.blocks_buffer(len(block_ids))
                ranks.recv(kv, 0)
                runner.write_blocks(block_ids, kv)
            runner.forward(command.batch)
        else:
            ranks.send(runner.read_blocks(command.block_ids), 0)


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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank-{args.rank} %(levelname)s %(message)s")
    threading.Thread(target=_exit_with_parent(os.getppid()), daemon=True).start()
    config = EngineConfig.model_validate_json(os.environ[CONFIG_ENV])
    follow(config, args.rank, args.world, args.store)


if __name__ == "__main__":
    # Through the module's own name: commands unpickle as shared.engine.tp_group's classes, not __main__'s.
    from shared.engine import tp_group

    tp_group.main()

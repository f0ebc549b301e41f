"""EngineRunner: an Engine's step loop on its own thread, driven from an asyncio event loop.

A call never makes the event loop wait for the engine's lock: `call` runs it inline when the lock is
free and no earlier call is pending (the common case; a thread hand-off cost an idle worker's TTFT
about 0.2 ms), else on a second, single thread, in the order the calls were made. The engine holds
its lock only around scheduling and output processing, not the forward pass, so an add, abort,
release or KV import lands within milliseconds even while a long step computes, and the step loop
picks it up at its next iteration. Step outputs come back through `call_soon_threadsafe`. NATS traffic, token
streaming and KV transfers keep flowing while the model computes (torch releases the GIL).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from shared.engine import Engine, EngineStats, StepOutput

log = logging.getLogger(__name__)

T = TypeVar("T")
X = TypeVar("X")

_IDLE_WAIT_S = 0.1  # safety net only: every call wakes the step loop
STOP_WAIT_S = 3.0  # the engine thread's longest step to finish at shutdown


@dataclass
class StepResult(Generic[X]):
    outputs: list[StepOutput]
    started: float  # wall-clock time the step began
    ended: float
    extra: X | None = None  # what the role's post-step hook computed on the engine thread
    stats: EngineStats | None = field(default=None)


class EngineRunner(Generic[X]):
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop,
                 on_step: Callable[[StepResult[X]], None],
                 post_step: Callable[[list[StepOutput]], X] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None, min_interval: float = 0.0) -> None:
        self.engine = engine
        self.loop = loop
        self.on_step = on_step
        self.post_step = post_step  # runs on the engine thread right after a step
        self.on_fatal = on_fatal  # the step loop died: the worker must stop, not hang
        self.min_interval = min_interval  # seconds from one step's start to the next's, at least
        self.stats: EngineStats = engine.stats()  # snapshot; read lock-free from the loop
        self.steps = 0
        self._calls = ThreadPoolExecutor(1, thread_name_prefix="engine-call")  # one thread: calls stay ordered
        self._pending = 0  # calls submitted to that thread and not finished: an inline call must wait for them
        self._pending_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable[[Engine], T]) -> asyncio.Future[T]:
        """Run fn(engine) after every earlier call; its result (or exception) on the loop.

        Engine calls are short (queue, reserve, free): inline when that cannot wait for a lock, else
        on the call thread.
        """
        if self._stopping:
            future: asyncio.Future[T] = self.loop.create_future()
            future.set_exception(RuntimeError("engine stopped"))
            return future
        with self._pending_lock:
            inline = self._pending == 0 and self.engine.lock.acquire(blocking=False)
            if not inline:
                self._pending += 1
        if not inline:
            return asyncio.wrap_future(self._calls.submit(self._call, fn), loop=self.loop)
        future = self.loop.create_future()
        try:
            future.set_result(fn(self.engine))
        except Exception as exc:
            future.set_exception(exc)
        finally:
            self.engine.lock.release()  # an RLock: fn's own `with engine.lock` nests in it
            self._called()
        return future

    def _call(self, fn: Callable[[Engine], T]) -> T:
        try:
            return fn(self.engine)
        finally:
            with self._pending_lock:
                self._pending -= 1
            self._called()

    def _called(self) -> None:
        self.stats = self.engine.stats()
        self._wake.set()  # the call may have given the step loop work (or room)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._calls.shutdown(wait=False, cancel_futures=True)
        if self._thread.is_alive():  # it ends with the step under way
            await asyncio.to_thread(self._thread.join, STOP_WAIT_S)
            if self._thread.is_alive():
                log.warning("the engine thread is still in a step after %.0f s", STOP_WAIT_S)

    # -- engine thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._wake.clear()  # before looking for work: a call made from here on wakes the wait below
            if engine.has_unfinished():
                started = time.time()
                try:
                    outputs = engine.step()
                except Exception as exc:  # a failed step must not kill the worker silently
                    log.exception("engine step failed")
                    self._fail(exc)
                    return
                ended = time.time()
                self.stats = engine.stats()  # even without outputs: a deferred abort may have freed blocks
                if outputs:
                    self.steps += 1
                    extra = self.post_step(outputs) if self.post_step else None
                    self.loop.call_soon_threadsafe(self.on_step, StepResult(outputs, started, ended, extra,
                                                                            self.stats))
                    rest = started + self.min_interval - time.time()
                    if rest > 0:  # paced: the CPU goes to whoever shares it until the next step is due
                        time.sleep(rest)
                    continue
            # Idle, or blocked on memory: sleep until a call (new work, a release, an abort).
            self._wake.wait(_IDLE_WAIT_S)

    def _fail(self, exc: BaseException) -> None:
        self._stopping = True
        self._calls.shutdown(wait=False, cancel_futures=True)  # nobody will step the engine now
        if self.on_fatal is not None:
            self.loop.call_soon_threadsafe(self.on_fatal, exc)

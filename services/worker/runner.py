"""EngineRunner: an LLMEngine's step loop on its own thread, driven from an asyncio event loop.

`engine.step()` holds the engine's lock for a whole forward pass (tens of ms to seconds), so the
event loop never calls the engine directly: it queues commands (`call`), which the engine thread
runs between steps, and gets step outputs back through `call_soon_threadsafe`. NATS traffic, token
streaming and KV transfers keep flowing while the model computes (torch releases the GIL).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from shared.engine import EngineStats, LLMEngine, StepOutput

log = logging.getLogger(__name__)

T = TypeVar("T")
X = TypeVar("X")

_IDLE_WAIT_S = 0.1  # safety net only: every state change arrives as a command, which wakes the thread


@dataclass
class StepResult(Generic[X]):
    outputs: list[StepOutput]
    started: float  # wall-clock time the step began
    ended: float
    extra: X | None = None  # what the role's post-step hook computed on the engine thread
    stats: EngineStats | None = field(default=None)


class EngineRunner(Generic[X]):
    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop,
                 on_step: Callable[[StepResult[X]], None],
                 post_step: Callable[[list[StepOutput]], X] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.loop = loop
        self.on_step = on_step
        self.post_step = post_step  # runs on the engine thread right after a step
        self.on_fatal = on_fatal  # the step loop died: the worker must stop, not hang
        self.stats: EngineStats = engine.stats()  # snapshot; read lock-free from the loop
        self.steps = 0
        self._commands: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], asyncio.Future[Any]]] = \
            queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable[[LLMEngine], T]) -> asyncio.Future[T]:
        """Run fn(engine) on the engine thread between steps; its result (or exception) on the loop."""
        future: asyncio.Future[T] = self.loop.create_future()
        self._commands.put((fn, future))
        self._wake.set()
        return future

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 30)
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                break
            _settle(future, None, RuntimeError("engine stopped"))

    # -- engine thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._run_commands()
            outputs: list[StepOutput] = []
            if engine.has_unfinished():
                started = time.time()
                try:
                    outputs = engine.step()
                except Exception as exc:  # a failed step must not kill the worker silently
                    log.exception("engine step failed")
                    self._fail(exc)
                    return
                if outputs:
                    ended = time.time()
                    self.steps += 1
                    extra = self.post_step(outputs) if self.post_step else None
                    self.stats = engine.stats()
                    self.loop.call_soon_threadsafe(self.on_step, StepResult(outputs, started, ended, extra,
                                                                            self.stats))
                    continue
            # Idle, or blocked on memory: sleep until a command (new work, a release, an abort).
            self._wake.wait(_IDLE_WAIT_S)
            self._wake.clear()

    def _fail(self, exc: BaseException) -> None:
        self._stopping = True
        while True:  # nobody will run the queued commands now
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                break
            self.loop.call_soon_threadsafe(_settle, future, None, RuntimeError("engine stopped"))
        if self.on_fatal is not None:
            self.loop.call_soon_threadsafe(self.on_fatal, exc)

    def _run_commands(self) -> None:
        ran = False
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                break
            ran = True
            try:
                result = fn(self.engine)
            except Exception as exc:
                self.loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                self.loop.call_soon_threadsafe(_settle, future, result, None)
        if ran:
            self.stats = self.engine.stats()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

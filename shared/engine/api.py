"""What a worker needs of an engine, without torch: the engine API's types and the `Engine` protocol.

Two engines implement it: `LLMEngine` (shared/engine/engine.py: the model, computed by torch) and
`EmulatedEngine` (shared/engine/emulated.py: the same scheduler and blocks, step times from a latency
profile). The services import only this module, so a worker of the emulated engine never loads torch.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from shared.protocol import KVHandle, KVMeta
from shared.sampling_params import SamplingParams

if TYPE_CHECKING:
    import numpy as np
    import torch

    from shared.engine.config import EngineConfig
    from shared.tokenizer import Tokenizer

    # The bytes of KV blocks: a torch tensor of the cache, or a numpy array (the emulator's); contiguous
    KVView = torch.Tensor | np.ndarray[Any, Any]
else:
    KVView = Any


@dataclass(frozen=True)
class StepOutput:
    request_id: str
    token_id: int
    text: str  # new text since the previous output of this request
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    num_held: int
    free_blocks: int
    total_blocks: int
    queued_prompt_tokens: int


@dataclass(frozen=True)
class StepRecord:
    """One engine step as the latency model sees it (services/planner/latency.py), timed whole."""

    ended: float  # wall-clock time the step ended
    seconds: float  # scheduling, forward pass, sampling and outputs: what the profiler times
    prefill_lengths: tuple[int, ...]  # tokens computed for each prefilling sequence
    decode_batch: int  # sequences decoding one token
    decode_context: int  # their context lengths summed (positions attended, the new one included)


@dataclass(frozen=True)
class KVExport:
    meta: KVMeta
    views: list[KVView]  # contiguous, in token order: the bytes of the first source of meta.shard_heads (all of them if
    # there is one), which the worker offers on its transport
    shard_addresses: list[str] = field(default_factory=list)  # where the others wait, offered by the engine's ranks

    @property
    def nbytes(self) -> int:
        """The bytes a pull moves: the views', or every source's (a tensor-parallel instance's)."""
        return self.meta.nbytes if self.shard_addresses else sum(int(v.nbytes) for v in self.views)


@dataclass(frozen=True)
class HeadShare:
    """The KV heads a set of KV views holds: [start, stop) of the model's `total`, `head_bytes` each per row
    (a row: one block, layer, K or V and slot). A tensor-parallel rank holds its own share."""

    start: int
    stop: int
    total: int
    head_bytes: int

    @property
    def row_bytes(self) -> int:
        return (self.stop - self.start) * self.head_bytes


@dataclass(frozen=True)
class KVImport:
    """Where an imported request's KV goes (`Engine.kv_import_begin`): `views` take the heads `heads` names,
    pulled from each source that has some of them (shared/transfer/heads.py). `heads` None: the views take
    one source's whole byte stream (the emulated engine, whose KV bytes are a stand-in)."""

    views: list[KVView]
    heads: HeadShare | None = None


class Engine(Protocol):
    """The engine API (docs/engine-api.md). Every method is thread-safe (it takes `lock`)."""

    config: EngineConfig
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    lock: threading.RLock

    @property
    def label(self) -> str:
        """What computes the steps, for logs and metrics: 'torch-cpu', 'emulated-a100', ..."""

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    output_token_ids: list[int] | None = None, num_emitted_chars: int | None = None) -> None: ...

    def abort(self, request_id: str) -> bool: ...

    def withdraw(self, request_id: str) -> bool: ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def step(self) -> list[StepOutput]: ...

    def take_step_records(self) -> list[StepRecord]: ...

    def kv_export(self, request_id: str) -> KVExport: ...

    def kv_import_begin(self, meta: KVMeta) -> KVImport | None: ...

    def kv_import_ranks(self, kv: KVHandle, timeout: float) -> Future[int] | None:
        """At tp > 1, ranks 1.. pull their own heads of the request's KV (after `kv_import_begin`); the future
        is their bytes once all have them, or a TransferError. None: this engine has no other ranks."""

    def kv_import_commit(self, request_id: str) -> None: ...

    def kv_import_recompute(self, request_id: str) -> None: ...

    def kv_import_set_aside(self, request_id: str) -> list[int]: ...

    def free_set_aside(self, blocks: list[int]) -> None: ...

    def kv_import_abort(self, request_id: str) -> None: ...

    def close(self) -> None: ...

    def modelled_transfer_s(self, meta: KVMeta) -> float:
        """Seconds a pull of this KV takes on top of moving its bytes here (the emulator's link model)."""

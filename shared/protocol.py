"""The control plane in one place: every NATS subject and every wire message (pydantic, JSON).

Version 1. The version is the second token of every subject (``distserve.v1.*``) and the ``v``
field of every message: a process speaking another version neither receives nor parses ours.
Within a version, fields are only ever added with defaults (unknown fields are ignored).

KV bytes never travel here: a message carries a `KVHandle` (where to pull from), the bytes move
over the KV transport (shared/transfer).

Flow (docs/architecture.md has the numbered steps):
  gateway --PrefillRequest--> prefill.<id>.submit
  prefill --TokenBatch (first token + KVHandle)--> gateway.<id>.tokens
  gateway --DecodeRequest--> decode.<id>.submit
  decode pulls the KV over the transport, then --KVRelease--> prefill.<id>.release
  decode --TokenBatch (one message per step)--> gateway.<id>.tokens
  every worker --WorkerInfo--> workers.heartbeat (load reports); --WorkerBye--> workers.bye
  gateway --AbortRequest--> requests.abort (every worker listens)
  planner --PlanMessage--> planner.plan (the recommended deployment; it listens to the subjects above)
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from shared.config import Role
from shared.sampling_params import SamplingParams

PROTOCOL_VERSION = 1
PREFIX = f"distserve.v{PROTOCOL_VERSION}"

__all__ = ["PREFIX", "Role", "SamplingParams"]  # re-exported: the wire carries them


# What a worker accepts as a request id and as the subject it answers to: anything else is dropped as
# malformed at parse time (a reply subject outside the gateways' inboxes would take tokens elsewhere).
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
ReplySubject = Annotated[str, StringConstraints(
    pattern=rf"^{re.escape(PREFIX)}\.gateway\.[A-Za-z0-9_-]{{1,64}}\.tokens$")]


class Subjects:
    """Subject names. Per-instance subjects end in the instance id (one subject token)."""

    heartbeat = f"{PREFIX}.workers.heartbeat"
    bye = f"{PREFIX}.workers.bye"
    abort = f"{PREFIX}.requests.abort"
    plan = f"{PREFIX}.planner.plan"
    scaling = f"{PREFIX}.planner.scaling"  # what the actuator did (ScalingAction)
    all_tokens = f"{PREFIX}.gateway.*.tokens"  # every gateway's inbox (the planner watches them)

    @staticmethod
    def submit(role: Role, instance_id: str) -> str:
        """New work for one worker: PrefillRequest (prefill, colocated) or DecodeRequest (decode)."""
        return f"{PREFIX}.{role}.{instance_id}.submit"

    @staticmethod
    def all_submits(role: Role) -> str:
        """New work for every worker of a role (the planner watches arrivals)."""
        return f"{PREFIX}.{role}.*.submit"

    @staticmethod
    def drain(instance_id: str) -> str:
        """Drain to one worker: take no new work, finish what it has, then leave."""
        return f"{PREFIX}.workers.{instance_id}.drain"

    @staticmethod
    def withdraw(instance_id: str) -> str:
        """WithdrawRequest to one worker: give back a request that has not started, to run elsewhere."""
        return f"{PREFIX}.workers.{instance_id}.withdraw"

    @staticmethod
    def release(instance_id: str) -> str:
        """KVRelease to the prefill worker that holds a request's KV."""
        return f"{PREFIX}.prefill.{instance_id}.release"

    @staticmethod
    def tokens(gateway_id: str) -> str:
        """The inbox of one gateway: TokenBatch messages for the requests it serves."""
        return f"{PREFIX}.gateway.{gateway_id}.tokens"


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    v: Literal[1] = 1  # PROTOCOL_VERSION

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


M = TypeVar("M", bound=Message)


def decode(kind: type[M], data: bytes) -> M:
    """Parse one message; pydantic.ValidationError on a malformed or other-version message."""
    return kind.model_validate_json(data)


class WorkerLoad(BaseModel):
    """What a worker reports about itself; the gateway dispatches on it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    queued_tokens: int = 0  # prompt tokens waiting for prefill
    waiting: int = 0  # requests waiting: for prefill, or (decode) for room to pull their KV
    running: int = 0  # sequences in the decode batch
    held: int = 0  # prefill: requests whose KV waits to be pulled
    free_blocks: int = 0
    total_blocks: int = 0


class WorkerInfo(Message):
    """Registration and heartbeat in one: sent at start, on load changes and every heartbeat_s."""

    instance_id: str
    role: Role
    model: str
    max_model_len: int
    pid: int
    host: str
    started_at: float
    seq: int = 0  # increases with every report of this instance
    transport: str | None = None  # KV transport name (prefill, decode)
    transfer_address: str | None = None  # where decode workers pull this prefill worker's KV
    load: WorkerLoad = WorkerLoad()
    engine: str = "torch-cpu"  # what computes its steps: torch-cpu, or emulated-<gpu> (no model runs)
    tp: int = 1  # the instance's parallelism (its placement in a plan)
    pp: int = 1
    draining: bool = False  # it takes no new work: it finishes what it has, then leaves (WorkerDrain)
    # The periodic heartbeat lists the requests the worker has (queued, pulling, running, or held for a
    # pull): a request its gateway placed here that stays missing was lost with a control message (NATS
    # delivers at most once) and is sent again. None in the reports on load changes.
    serving: list[str] | None = None
    sent_at: float = 0.0  # wall-clock time the report was built (what `serving` is as of)


class WorkerBye(Message):
    instance_id: str


class WorkerDrain(Message):
    """To one worker (Subjects.drain): finish your requests, take no new ones, then shut down. The way a
    deployment shrinks without a request moving (the actuator's scale-down)."""

    instance_id: str


class PrefillRequest(Message):
    """A tokenized request for a prefill (or colocated) worker."""

    request_id: RequestId
    prompt_token_ids: list[int]
    sampling: SamplingParams
    reply_to: ReplySubject  # the gateway's tokens subject
    arrived_at: float  # wall-clock time the gateway accepted it
    # A migrated request (its worker died): the tokens already streamed and how many characters of
    # their text the client has; the worker computes their KV too and continues after them.
    output_token_ids: list[int] = []
    num_emitted_chars: int = 0


class KVMeta(BaseModel):
    """What a decode engine needs, besides the KV bytes, to continue a request exactly (LLMEngine.kv_export)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    num_kv_tokens: int
    num_blocks: int
    block_size: int
    block_nbytes: int
    output_text: str | None  # text generated so far (None: decode it from output_token_ids) and how much
    num_emitted_chars: int  # of it was already streamed
    dtype: str = "float32"  # of the exported KV; an importer in another dtype converts it (EngineConfig.dtype)
    # KV heads of each source, in head order, when a tensor-parallel instance offers the KV one rank per
    # source (shared/transfer/heads.py); empty: one source offers every head
    shard_heads: list[int] = Field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_nbytes


class KVHandle(BaseModel):
    """Where a request's KV cache waits to be pulled, and what the decode side needs to continue it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    prefill_instance: str
    transport: str
    address: str
    transfer_id: str
    nbytes: int
    meta: KVMeta
    shard_addresses: list[str] = Field(default_factory=list)  # sources 1.. of meta.shard_heads (0 is `address`)


class DecodeRequest(Message):
    request_id: RequestId
    reply_to: ReplySubject
    kv: KVHandle
    # A migrated request whose KV no prefill worker holds any more (its decode worker died mid-stream):
    # pull nothing, compute the KV here from kv.meta's tokens (the prompt and every token streamed).
    recompute: bool = False


class KVRelease(Message):
    """Decode has the KV (or gave up on it): the prefill worker may free its blocks."""

    request_id: RequestId
    pulled: bool = True


class AbortRequest(Message):
    request_id: RequestId
    reason: str = "client disconnected"
    instance_id: str | None = None  # only this worker acts on it (a request migrated away); None: every worker


class WithdrawRequest(Message):
    """The gateway moves queued work onto a worker that joined: a request still waiting (nothing of it
    computed) is given back with a `migrate` event and continues on the least-loaded worker; one already
    started stays."""

    request_id: RequestId
    reason: str


class TransferInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    nbytes: int
    seconds: float
    transport: str


class TokenEvent(BaseModel):
    """One generated token of one request (or the error that ended it)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    request_id: str
    token_id: int = -1
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    kv: KVHandle | None = None  # prefill's first token: the KV is ready to be pulled
    transfer: TransferInfo | None = None  # decode's first token: how the KV arrived
    error: str | None = None  # the request failed; `status` is the HTTP status to report
    status: int = 200
    migrate: bool = False  # with `error`: the worker gave the request up (shutting down); continue it elsewhere


class TokenBatch(Message):
    """Every event one step produced for one gateway: one message per step, not per token."""

    instance_id: str
    events: list[TokenEvent]


class PhaseShape(BaseModel):
    """How one phase is deployed: instances of tp x pp GPUs each."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    tp: int
    pp: int
    instances: int
    gpus: int


class ScalingAction(Message):
    """The actuator started or drained a worker to follow a plan (services/planner/actuator.py)."""

    kind: Literal["start", "drain"]
    role: Role
    tp: int
    pp: int
    reason: str
    instance: str | None = None
    at: float


class PlanMessage(Message):
    """The online planner's recommended deployment for the traffic it observed (services/planner/service.py)."""

    model: str
    hardware: str
    rate: float  # req/s the plan serves
    gpus: int
    prefill: PhaseShape
    decode: PhaseShape
    goodput_per_gpu: float | None  # simulated; None where it is not a number
    speedup_per_gpu: float | None = None  # over the colocated baseline, where it has one
    reason: str  # why this plan was made now
    observed_rate: float  # arrivals/s over the planner's window
    at: float  # wall-clock time it was made


MESSAGES: tuple[type[Message], ...] = (
    WorkerInfo, WorkerBye, PrefillRequest, DecodeRequest, KVRelease, AbortRequest, TokenBatch, PlanMessage,
)

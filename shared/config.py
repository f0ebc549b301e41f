"""The serving stack's settings: one typed, validated, frozen object for every service.

Sources, highest priority first: command-line flags, environment (``DISTSERVE_MODEL``,
``DISTSERVE_GATEWAY__PORT``: ``__`` separates nesting levels), a YAML or JSON file
(``--config``), then the defaults below. `distserve up` resolves them once and hands the result
to its children as a file, so every process of one stack runs with the same settings.
"""

from __future__ import annotations

import argparse
import contextvars
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Self, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FieldSerializationInfo,
    SecretStr,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from shared.model_files import tokenizer_source

Mode = Literal["disaggregated", "colocated"]
EngineKind = Literal["torch", "emulated"]
GPU = Literal["a100", "h100", "h200"]
Role = Literal["prefill", "decode", "colocated"]
DType = Literal["float32", "bfloat16"]
# linear weights: in the engine's dtype; fp16 or int8 (torch's kernels); q8_0 or q4_1 (GGUF's blocks, our kernel)
Weights = Literal["native", "fp16", "int8", "q8_0", "q4_1"]
Auto = Literal["auto"]  # chosen per CPU and role where the engine starts (shared/engine/precision.py)
Device = Literal["auto", "cpu", "cuda"]  # auto: cuda when torch sees a GPU (shared/engine/device.py)
INSTANCE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # one NATS subject token

_URL_SCHEMES = {"nats_url": (("nats", "tls", "ws", "wss"), "nats://host:port"),
                "redis_url": (("redis", "rediss", "unix"), "redis://host:port/db")}

REVEAL_SECRETS = {"reveal_secrets": True}  # model_dump context: secrets in clear (`up`'s private settings file)

_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("config_file", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EngineSettings(_Section):
    """How one engine instance runs: the one definition of the engine's knobs.

    `shared.engine.EngineConfig` is these plus which model and role; each worker role's section of
    `Settings` is these plus how the worker shares the CPU (`RoleSettings`).
    """

    max_num_batched_tokens: int = Field(default=2048, ge=1, description="prefill token budget per step (L_m); "
                                        "a longer prompt runs alone")
    max_num_seqs: int = Field(default=64, ge=1, description="decode batch cap")
    block_size: int = Field(default=16, ge=1, description="tokens per KV block")
    kv_cache_memory_gib: float = Field(default=1.0, gt=0, description="KV pool size; its capacity in blocks "
                                       "derives from it")
    max_model_len: int | None = Field(default=None, ge=1, description="context length; None: the model's")
    num_threads: int | None = Field(default=None, ge=1, description="torch threads; None: all cores (workers: "
                                    "`up` gives each its share)")
    chunked_prefill: bool = Field(default=False, description="colocated only: Sarathi-style prefill chunks "
                                  "mixed with decodes")
    dtype: DType | Auto = Field(default="auto", description="weights, activations and KV: auto (per CPU and role), "
                                "float32 or bfloat16")
    weights: Weights | Auto = Field(default="auto", description="linear weights: auto (per CPU and role), native (in "
                                    "dtype), fp16, int8, q8_0 or q4_1 (all but native with float32 activations; q4_1 "
                                    "keeps the LM head q8_0)")
    # Decode-only steps as one torch.compile graph: about 1.5x faster decode at batch 1 with fp16 weights,
    # paid for with 12-15 s (warm inductor cache) to 1.5 min (cold) of compiling at engine start.
    compile: bool = Field(default=False, description="compile decode steps at start (shared/engine/compiled.py)")
    paged_attention: bool = Field(default=True, description="decode attention by a C++ kernel over the paged "
                                  "cache (else gather + SDPA)")
    device: Device = Field(default="auto", description="where the torch engine computes: auto (cuda when torch "
                           "sees a GPU), cpu or cuda (an error if there is none)")
    cuda_graphs: bool = Field(default=True, description="on a GPU at tp 1: decode steps replay CUDA graphs captured "
                              "at start (shared/engine/cuda_graphs.py)")
    tp: int = Field(default=1, ge=1, le=64, description="tensor-parallel degree of an instance: the torch engine "
                    "runs that many processes (shared/engine/tp_group.py); the emulated engine models it")
    pp: int = Field(default=1, ge=1, le=64, description="pipeline stages of an instance (emulated engine; the torch "
                    "engine runs 1)")
    pack_bf16: bool = Field(default=True, description="bfloat16 linear weights reordered once for oneDNN, where "
                            "the CPU has its kernels")

    @field_validator("weights", "dtype", mode="before")
    @classmethod
    def _one_of(cls, value: Any, info: ValidationInfo) -> Any:
        allowed = ("auto", *get_args(Weights if info.field_name == "weights" else DType))
        if value not in allowed:
            raise ValueError(f"{info.field_name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, not {value!r}")
        return value

    @model_validator(mode="after")
    def _compile_is_one_rank(self) -> Self:
        if self.compile and self.tp > 1:
            raise ValueError("compile applies to tp=1: a tensor-parallel step all-reduces between eager layers")
        return self

    @model_validator(mode="after")
    def _weights_need_float32(self) -> Self:
        if self.weights not in ("native", "auto") and self.dtype == "bfloat16":
            raise ValueError(f"weights={self.weights} runs with float32 activations: set weights=native for "
                             f"dtype={self.dtype}")
        return self


class RoleSettings(EngineSettings):
    """One worker role's settings: its engine's, plus how its worker processes share the CPU."""

    step_interval_s: float = Field(default=0.0, ge=0, le=10, description="decode only: start steps at most this "
                                   "often (a TPOT pace under the SLO), leaving the rest of each interval to the "
                                   "workers sharing the cores; 0: step as fast as possible")
    nice: int = Field(default=0, ge=0, le=19, description="lower the workers' CPU priority by this (Linux nice): "
                      "on shared cores, the other roles run first (shared/cpus.py lower_priority)")


class GatewaySettings(_Section):
    host: str = Field(default="127.0.0.1", description="address the gateway binds")
    port: int = Field(default=8000, ge=0, le=65535, description="the gateway's HTTP port")
    max_pending: int = Field(default=256, ge=1, description="requests awaiting a first token before 429")
    retry_after_s: int = Field(default=1, ge=1)
    request_timeout_s: float = Field(default=600.0, gt=0)
    migration_limit: int = Field(default=3, ge=0, description="times a request moves to another worker when "
                                 "its worker dies before it ends with an error (0: never)")
    migration_wait_s: float = Field(default=1.5, ge=0, description="how long a request whose worker died waits "
                                    "for a live worker of its phase before it ends with 503")
    rebalance_on_join: bool = Field(default=True, description="a worker that joins a phase takes its share of "
                                    "the requests still queued on the others (those not yet started move)")
    nats_outage_s: float = Field(default=15.0, gt=0, description="requests waiting on a lost NATS connection "
                                 "end with 503 after this long")
    slo_ttft_s: float = Field(default=2.0, gt=0, description="TTFT objective for the SLO-attainment metric")
    slo_tpot_s: float = Field(default=0.2, gt=0, description="TPOT objective for the SLO-attainment metric")
    api_keys: list[SecretStr] = Field(default=[], description="keys clients send as 'Authorization: Bearer KEY' "
                                      "(env DISTSERVE_GATEWAY__API_KEYS as a JSON list)")
    api_keys_file: Path | None = Field(default=None, description="a file of API keys, one per line")
    auth_health_metrics: bool = Field(default=False, description="/health and /metrics need a key too")
    allow_unauthenticated: bool = Field(default=False, description="serve without API keys on an address beyond "
                                        "loopback (without it, such a gateway refuses to start)")

    @field_serializer("api_keys", when_used="json")
    def _keys(self, keys: list[SecretStr], info: FieldSerializationInfo) -> list[str]:
        reveal = bool(info.context and info.context.get("reveal_secrets"))
        return [k.get_secret_value() if reveal else str(k) for k in keys]

    @model_validator(mode="after")
    def _authenticated_beyond_loopback(self) -> Self:
        if self.api_keys or self.api_keys_file or self.allow_unauthenticated or is_loopback(self.host):
            return self
        raise ValueError(f"the gateway would serve {self.host}, beyond loopback, to anyone: give it API keys "
                         "(gateway.api_keys or gateway.api_keys_file) or set gateway.allow_unauthenticated")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


class WorkerSettings(_Section):
    heartbeat_s: float = Field(default=0.5, gt=0, description="interval of load reports")
    dead_after_s: float = Field(default=3.0, gt=0, description="a worker silent this long is dropped")
    transport: str = Field(default="auto", description="KV transport: auto (ucx when ucxx imports, else tcp), ucx, tcp")
    transfer_host: str = Field(default="127.0.0.1", description="address the KV transport listens on")
    kv_lease_s: float = Field(default=300.0, gt=0, description="prefill frees KV nobody pulled after this")
    pull_timeout_s: float = Field(default=30.0, gt=0, description="a KV pull that takes longer has failed")
    kv_failure_policy: Literal["recompute", "fail"] = Field(
        default="recompute", description="a failed KV pull: decode recomputes the prefill, or the request fails")
    shutdown_timeout_s: float = Field(
        default=15.0, gt=0, description="a worker whose shutdown takes longer dumps its threads' stacks and exits")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="the worker's own Prometheus /metrics "
                              "(steps, batches, queue time, KV usage); 0: off")
    metrics_host: str = Field(default="127.0.0.1", description="address the worker's /metrics listens on")


class EmulationSettings(_Section):
    """The emulated GPU engine (`engine: emulated`, shared/engine/emulated.py): the real serving path, with
    each step taking the time a latency profile gives for its batch on `gpu` at the role's tp and pp."""

    gpu: GPU = Field(default="a100", description="the GPU emulated")
    profile: str = Field(default="reference", description="step times: reference (the published A100 profiles: "
                         "DistServe's for prefill and decode, vLLM's for colocated), roofline (analytical, any "
                         "model and GPU) or a profile JSON")
    kv_fraction: float = Field(default=1 / 1024, gt=0, le=1, description="share of the model's real KV bytes "
                               "that moves over the transport; the rest is modelled link time")
    link_gbps: float = Field(default=2400.0, gt=0, description="KV link from prefill to decode for the modelled "
                             "part (2400: A100 NVLink; 25-200: across nodes)")


class AutoscaleSettings(_Section):
    """`up --plan P --autoscale`: the online planner replans from the traffic and the actuator follows it
    (services/planner/actuator.py)."""

    enabled: bool = Field(default=False, description="run the online planner and act on its plans")
    window_s: float = Field(default=30.0, gt=0, description="seconds of traffic each plan is made from")
    interval_s: float = Field(default=5.0, gt=0, description="seconds between the planner's evaluations")
    threshold: float = Field(default=0.2, gt=0, description="relative shift of rate or lengths that replans")
    cooldown_s: float = Field(default=20.0, ge=0, description="no scaling action within this long of the last")
    scale_down_after_s: float = Field(default=40.0, ge=0, description="fewer instances must be planned this long "
                                      "without a break before any is drained")
    drain_timeout_s: float = Field(default=120.0, gt=0, description="a drained worker still busy after this is "
                                   "stopped (its requests migrate)")


class TelemetrySettings(_Section):
    exporter: Literal["none", "console", "otlp"] = Field(default="none", description="where traces go")
    otlp_endpoint: str = Field(default="http://127.0.0.1:4318/v1/traces", description="OTLP/HTTP traces endpoint")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTSERVE_", env_nested_delimiter="__", frozen=True,
                                      extra="forbid")

    model: str = Field(default="default", description="'default' (SmolLM2-135M-Instruct), a .gguf file, a Hugging "
                       "Face directory or random:<json>; with the emulated engine, a profile's model (opt-13b, ...)")
    engine: EngineKind = Field(default="torch", description="torch (computes the model) or emulated (GPU step "
                               "times from a latency profile; tokens are placeholders)")
    emulation: EmulationSettings = EmulationSettings()
    mode: Mode = "disaggregated"
    nats_url: str | None = Field(default=None, description="external NATS; None: `up` starts one")
    redis_url: str | None = Field(default=None, description="external Redis; None: `up` starts one")
    prefill_instances: int = Field(default=1, ge=0)
    decode_instances: int = Field(default=1, ge=0)
    colocated_instances: int = Field(default=1, ge=0)
    request_ttl_s: int = Field(default=3600, ge=1, description="how long Redis keeps a request's state")
    pin_workers: bool = Field(default=False, description="`up` pins each worker to CPUs of its own (shared/cpus.py)")
    service_cpus: list[int] | None = Field(default=None, description="CPUs `up` pins the gateway, NATS and Redis to")
    restart: Literal["on-failure", "never"] = Field(default="on-failure", description="`up` restarts a child that "
                                                    "dies (with backoff), or stops the whole stack (never)")
    restart_limit: int = Field(default=5, ge=0, description="`up` stops the stack when a child dies this many more "
                               "times in a row (each within a minute of its restart)")
    gateway: GatewaySettings = GatewaySettings()
    worker: WorkerSettings = WorkerSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    autoscale: AutoscaleSettings = AutoscaleSettings()
    prefill: RoleSettings = RoleSettings()
    decode: RoleSettings = RoleSettings()
    colocated: RoleSettings = RoleSettings()

    def role(self, role: Role) -> RoleSettings:
        section: RoleSettings = getattr(self, role)
        return section

    @property
    def tokenizer_model(self) -> str:
        """The model whose tokenizer the gateway and the engines use: an emulated model has none of its own,
        and takes the default model's; a random one its spec's (shared/model_files.py)."""
        return "default" if self.engine == "emulated" else tokenizer_source(self.model)

    @property
    def nats_address(self) -> str:
        """Where to connect: the external server, or the one `up` starts on its default port."""
        return self.nats_url or "nats://127.0.0.1:4222"

    @field_validator("nats_url", "redis_url")
    @classmethod
    def _url_scheme(cls, url: str | None, info: ValidationInfo) -> str | None:
        schemes, example = _URL_SCHEMES[info.field_name or ""]
        scheme, separator, _ = (url or "").partition("://")
        if url is not None and (not separator or scheme not in schemes):
            raise ValueError(f"{info.field_name} must look like {example}")
        return url

    @field_validator("service_cpus")
    @classmethod
    def _cpus(cls, cpus: list[int] | None) -> list[int] | None:
        if cpus is not None and (not cpus or min(cpus) < 0):
            raise ValueError("service_cpus must list CPU numbers >= 0")
        return cpus

    @model_validator(mode="after")
    def _roles(self) -> Settings:
        if self.prefill.chunked_prefill or self.decode.chunked_prefill:
            raise ValueError("chunked_prefill applies to colocated workers only")
        if self.prefill.step_interval_s or self.colocated.step_interval_s:
            raise ValueError("step_interval_s applies to decode workers only (a pace would delay prefills)")
        if self.engine == "torch" and any(self.role(r).pp > 1 for r in get_args(Role)):
            raise ValueError("pp above 1 needs the emulated engine: the torch engine runs one pipeline stage")
        if self.engine == "emulated" and self.colocated.pp > 1:
            raise ValueError("colocated.pp: the emulated colocated baseline runs one pipeline stage (as the "
                             "simulator's)")
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        file = _config_file.get()
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if file is not None:  # YAML is a superset of JSON: one source reads both
            sources += (YamlConfigSettingsSource(settings_cls, yaml_file=file),)
        return sources


def load_settings(overrides: Mapping[str, Any] | None = None,
                  config_file: str | Path | None = None) -> Settings:
    """Resolve flags (`overrides`, nested dicts) over environment over file over defaults."""
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")
    token = _config_file.set(Path(config_file) if config_file else None)
    try:
        return Settings(**dict(overrides or {}))
    finally:
        _config_file.reset(token)


# -- command-line flags ----------------------------------------------------------------------
# Flag -> dotted settings path (ENGINE_FLAGS: under a role's section); type and help come from the field.
# Only flags the user gave (not None) override the other sources.
COMMON_FLAGS = {"--model": "model", "--engine": "engine", "--gpu": "emulation.gpu",
                "--latency-profile": "emulation.profile", "--nats-url": "nats_url", "--redis-url": "redis_url",
                "--transport": "worker.transport", "--transfer-host": "worker.transfer_host",
                "--kv-failure-policy": "worker.kv_failure_policy", "--otel": "telemetry.exporter",
                "--otlp-endpoint": "telemetry.otlp_endpoint"}
GATEWAY_FLAGS = {"--host": "gateway.host", "--port": "gateway.port", "--max-pending": "gateway.max_pending"}
ENGINE_FLAGS = {"--max-num-batched-tokens": "max_num_batched_tokens", "--max-num-seqs": "max_num_seqs",
                "--kv-cache-gib": "kv_cache_memory_gib", "--threads": "num_threads", "--weights": "weights",
                "--tp": "tp", "--pp": "pp", "--device": "device"}


def add_flags(parser: argparse.ArgumentParser, table: Mapping[str, str], prefix: str = "") -> None:
    for flag, path in table.items():
        field = _field(f"{prefix}{path}")
        kind, choices = _flag_type(field.annotation)
        parser.add_argument(flag, dest=f"cfg:{prefix}{path}", type=kind, choices=choices, default=None,
                            metavar=None if choices else path.rsplit(".", 1)[-1].upper(), help=field.description)


def _field(path: str) -> FieldInfo:
    """The settings field at a dotted path, e.g. decode.max_num_seqs."""
    model: type[BaseModel] = Settings
    *sections, leaf = path.split(".")
    for section in sections:
        model = model.model_fields[section].annotation  # type: ignore[assignment]  # a section is a model
    return model.model_fields[leaf]


def _flag_type(annotation: Any) -> tuple[type, tuple[Any, ...] | None]:
    """(argparse type, choices) of a field's annotation: int | None -> int, Literal["a", "b"] -> str, choices
    (of all the literals of a union of them)."""
    kinds = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) in (Union, UnionType) \
        else [annotation]
    if all(get_origin(kind) is Literal for kind in kinds):
        return str, tuple(choice for kind in kinds for choice in get_args(kind))
    (kind,) = kinds
    return kind, None


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML or JSON settings file")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Nested override dict from the `cfg:` flags that were given on the command line."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith("cfg:") or value is None:
            continue
        *parents, leaf = dest[4:].split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Nested overrides: `top` over `base`, section by section."""
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def settings_from_args(args: argparse.Namespace, extra: Mapping[str, Any] | None = None) -> Settings:
    overrides = overrides_from_args(args)
    for key, value in (extra or {}).items():
        overrides[key] = value
    return load_settings(overrides, getattr(args, "config", None))


def check_instance_id(instance_id: str) -> str:
    if not INSTANCE_ID.match(instance_id):
        raise ValueError(f"instance id {instance_id!r}: use 1-64 letters, digits, '-' or '_'")
    return instance_id

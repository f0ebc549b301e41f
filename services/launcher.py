"""`distserve up`: the whole stack on this machine, one command (what `make run` starts).

Starts a nats-server and a redis-server on 127.0.0.1 (unless --nats-url / --redis-url point at
external ones), resolves the settings once and hands them to every child as a file, then starts
the workers and the gateway as child processes, each in its own session so that a Ctrl-C reaches
only this launcher, which stops them in order: gateway, workers, servers. The cores are split
between the workers.

Supervision (`--restart`, default on-failure): a worker or gateway that dies is logged and started again
after a backoff (0.5 s, doubling up to 30 s), while the rest keep serving; the restarted worker
re-registers with the gateway under its instance id. A child that dies `restart_limit` more times, each
within a minute of its last start, stops the stack, as does any death with `--restart never` (the
fail-fast that tests of a fixed topology want). The embedded nats-server and redis-server are restarted
on their ports the same way.

`--plan plan.yaml` starts what `distserve plan --yaml` planned (services/planner/deployment.py); with
`--autoscale` the stack also runs the online planner and follows its plans: the actuator
(services/planner/actuator.py) starts workers here (`add_worker`) and drains the surplus (`retire`:
the worker leaves once its requests are done, and is not restarted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import cast

import httpx

from services.planner.actuator import Actuator, Autoscaler, Running
from services.planner.deployment import PlannedDeployment
from shared.argtypes import cpu_list
from shared.config import (
    COMMON_FLAGS,
    GATEWAY_FLAGS,
    REVEAL_SECRETS,
    Role,
    Settings,
    add_config_flag,
    add_flags,
    deep_merge,
    load_settings,
    overrides_from_args,
)
from shared.cpus import assign_worker_cpus, available_cpus, check_cpus, pin_process
from shared.credentials import write_private
from shared.gpus import assign_gpus, visible_gpus
from shared.model_files import cache_dir
from shared.servers import NatsServer, RedisServer, ServerProcess

log = logging.getLogger("distserve.up")

_READY_TIMEOUT_S = 600.0  # a first start dequantizes the model (seconds) per process
_DRAIN_TIMEOUT_S = 120.0  # a retired worker still busy after this is stopped (its requests migrate)
_SERVICES = ("gateway", "planner")  # the children that are not workers
_STOP_WAIT_S = 20.0  # a child's own shutdown is bounded below this (worker.shutdown_timeout_s, 15 s)
_PLANNER_REQUESTS = 300  # simulated requests per goodput search of the online planner: a replan in seconds


def stack_file() -> Path:
    """Where a running embedded stack writes its URLs (read by `distserve requests`)."""
    return cache_dir() / "stack.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("up", help="start the whole stack (servers, workers, gateway) on this machine")
    add_config_flag(parser)
    add_flags(parser, COMMON_FLAGS)
    add_flags(parser, GATEWAY_FLAGS)
    add_flags(parser, {"--restart": "restart", "--restart-limit": "restart_limit"})
    parser.add_argument("--mode", dest="cfg:mode", choices=["disaggregated", "colocated"], default=None,
                        help="disaggregated prefill/decode workers (default) or colocated workers (baseline)")
    parser.add_argument("--prefill", dest="cfg:prefill_instances", type=int, default=None, help="prefill workers")
    parser.add_argument("--decode", dest="cfg:decode_instances", type=int, default=None, help="decode workers")
    parser.add_argument("--workers", dest="cfg:colocated_instances", type=int, default=None,
                        help="colocated workers (--mode colocated)")
    parser.add_argument("--chunked-prefill", dest="cfg:colocated.chunked_prefill", action="store_true", default=None,
                        help="colocated workers mix prefill chunks with decodes (Sarathi-Serve)")
    parser.add_argument("--pin-workers", dest="cfg:pin_workers", action="store_true", default=None,
                        help="pin each worker to CPUs of its own, in start order (prefill, then decode)")
    parser.add_argument("--service-cpus", dest="cfg:service_cpus", type=cpu_list, default=None,
                        help="CPUs for the gateway, NATS and Redis, e.g. 1 or 0,2-3 (default: any)")
    parser.add_argument("--plan", type=Path, help="start what `distserve plan --yaml` planned: its prefill and decode "
                        "instances with their TP and PP (emulated GPUs for a reference or roofline plan); flags "
                        "given here override it")
    parser.add_argument("--baseline", action="store_true", help="with --plan: start the plan's colocated baseline "
                        "instead")
    parser.add_argument("--autoscale", dest="cfg:autoscale.enabled", action="store_true", default=None,
                        help="with --plan: the online planner replans from the traffic and the stack follows "
                        "(starts workers, drains surplus ones)")
    parser.add_argument("--log-level", default=os.environ.get("DISTSERVE_LOG_LEVEL", "INFO"))
    parser.set_defaults(func=run)


_STABLE_S = 60.0  # a child up this long has recovered: its restarts count from zero again
_BACKOFF_S, _MAX_BACKOFF_S = 0.5, 30.0


def backoff_s(restarts: int) -> float:
    """How long to wait before a child's restart number `restarts` + 1."""
    return min(_MAX_BACKOFF_S, _BACKOFF_S * 2 ** restarts)


@dataclass
class Restarts:
    """A supervised process's restart state."""

    started: float = 0.0  # time.monotonic() of the current process's start
    restarts: int = 0  # in a row, each within _STABLE_S of the previous start
    due: float | None = None  # when the dead process is started again


@dataclass
class Child:
    name: str
    args: list[str]
    cpus: list[int] | None
    proc: subprocess.Popen[bytes]
    state: Restarts
    gpus: list[int] | None = None  # what its CUDA_VISIBLE_DEVICES shows it (shared/gpus.py); None: unchanged
    retiring_since: float | None = None  # draining to leave (`retire`): its exit is no failure
    terminated: bool = False  # it outlived the drain deadline and got SIGTERM


def uses_gpus(settings: Settings, role: Role) -> bool:
    """Whether the role's workers compute on CUDA: device cuda, or auto on a machine with GPUs."""
    device = settings.role(role).device
    return settings.engine == "torch" and (device == "cuda" or (device == "auto" and bool(visible_gpus())))


def worker_names(settings: Settings) -> list[tuple[str, str]]:
    """(role, instance id) of every worker the settings ask for."""
    if settings.mode == "colocated":
        return [("colocated", f"colocated-{i}") for i in range(settings.colocated_instances)]
    return ([("prefill", f"prefill-{i}") for i in range(settings.prefill_instances)]
            + [("decode", f"decode-{i}") for i in range(settings.decode_instances)])


def split_threads(settings: Settings, num_workers: int, cores: int) -> Settings:
    """Give each worker role that has no explicit thread count its share of the cores."""
    share = max(1, cores // max(1, num_workers))
    updates = {role: getattr(settings, role).model_copy(update={"num_threads": share})
               for role in ("prefill", "decode", "colocated") if getattr(settings, role).num_threads is None}
    return settings.model_copy(update=updates)


def worker_threads(settings: Settings, role: str) -> int:
    threads = getattr(settings, role).num_threads
    assert threads is not None  # split_threads has run
    return int(threads)


def up_settings(args: argparse.Namespace) -> tuple[Settings, PlannedDeployment | None]:
    """The flags over the plan (`--plan`) over the environment over the config file; and the plan."""
    overrides = overrides_from_args(args)
    if args.baseline and not args.plan:
        raise ValueError("--baseline starts a plan's colocated baseline: give --plan too")
    plan = PlannedDeployment.load(args.plan) if args.plan else None
    if plan is not None:
        overrides = deep_merge(plan.overrides(baseline=args.baseline), overrides)
        log.info("plan %s: %s at %g req/s, %s", args.plan, plan.model, plan.rate, plan.describe(args.baseline))
    settings = load_settings(overrides, args.config)
    if settings.autoscale.enabled and (plan is None or args.baseline):
        raise ValueError("--autoscale follows a plan's disaggregated deployment: give --plan (without --baseline)")
    return settings, plan


def check_counts(settings: Settings) -> None:
    if settings.mode == "colocated" and settings.colocated_instances < 1:
        raise ValueError("--mode colocated needs --workers >= 1")
    if settings.mode == "disaggregated" and (settings.prefill_instances < 1 or settings.decode_instances < 1):
        raise ValueError("the disaggregated stack needs --prefill >= 1 and --decode >= 1")


class Stack:
    def __init__(self, settings: Settings, log_level: str = "INFO", announce: bool = True,
                 plan: PlannedDeployment | None = None) -> None:
        self.settings = settings
        self.plan = plan  # what `up --plan` started: the online planner replans its problem (--autoscale)
        self.autoscaler: Autoscaler | None = None
        self.log_level = log_level
        self.announce = announce  # write stack_file() for `distserve requests` (not in tests)
        self.servers: list[ServerProcess] = []
        self.children: list[Child] = []
        self._server_restarts: dict[str, Restarts] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="distserve-up-")
        self.stopping = False
        self.drain_timeout_s = _DRAIN_TIMEOUT_S

    def start(self) -> None:
        """Servers, workers, gateway; RuntimeError if the settings cannot be met here (e.g. pinning)."""
        workers = worker_names(self.settings)
        s = split_threads(self.settings, len(workers), len(available_cpus()))
        try:
            if s.service_cpus is not None:
                check_cpus(s.service_cpus)
            pinned = (assign_worker_cpus([worker_threads(s, role) for role, _ in workers], available_cpus())
                      if s.pin_workers else [None] * len(workers))
            gpus = self._worker_gpus([cast(Role, role) for role, _ in workers])
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None
        updates: dict[str, str] = {}
        if s.nats_url is None:
            updates["nats_url"] = self._server(NatsServer.with_password()).url
        if s.redis_url is None:
            updates["redis_url"] = self._server(RedisServer.with_password()).url
        s = s.model_copy(update=updates)
        self.settings = s
        write_private(self._config, s.model_dump_json(context=REVEAL_SECRETS))  # the children's settings, secrets too
        for (role, instance_id), cpus, worker_gpus in zip(workers, pinned, gpus, strict=True):
            self._spawn(instance_id, [role, "--config", str(self._config), "--instance-id", instance_id], cpus,
                        worker_gpus)
        self._spawn("gateway", ["gateway", "--config", str(self._config)], s.service_cpus)
        if s.autoscale.enabled:
            self._start_autoscaling(s)
        if self.announce:
            stack_file().parent.mkdir(parents=True, exist_ok=True)
            write_private(stack_file(), json.dumps({"gateway": self.url, "nats_url": s.nats_url,
                                                "redis_url": s.redis_url, "pid": os.getpid()}))

    def _start_autoscaling(self, s: Settings) -> None:
        if self.plan is None:
            raise RuntimeError("autoscaling follows a plan: start the stack from one")
        a = s.autoscale
        self._spawn("planner", ["planner", "--config", str(self._config), *self.plan.planner_args(),
                                "--window", str(a.window_s), "--interval", str(a.interval_s),
                                "--threshold", str(a.threshold), "--num-requests", str(_PLANNER_REQUESTS)],
                    s.service_cpus)
        self.drain_timeout_s = a.drain_timeout_s
        assert s.nats_url is not None
        self.autoscaler = Autoscaler(Actuator(a.cooldown_s, a.scale_down_after_s), s.nats_url, s.redis_url)
        self.autoscaler.start()

    @property
    def _config(self) -> Path:
        return Path(self._dir.name) / "settings.json"

    # -- scaling (the actuator's connector: services/planner/actuator.py) ----------------------------------

    def running(self) -> list[Running]:
        """The workers that run and are not retiring, with their parallelism."""
        out = []
        for c in self.children:
            if c.name in _SERVICES or c.retiring_since is not None:
                continue
            role = cast(Role, c.args[0])  # a worker's first argument is its role
            flags = dict(zip(c.args[1::2], c.args[2::2], strict=False))
            section = self.settings.role(role)
            out.append(Running(c.name, role, int(flags.get("--tp", section.tp)), int(flags.get("--pp", section.pp))))
        return out

    def add_worker(self, role: str, tp: int = 1, pp: int = 1) -> str:
        """Start one more worker of `role` (with this parallelism); its instance id. RuntimeError if it
        computes on GPUs and too few are free."""
        gpus = None
        if uses_gpus(self.settings, cast(Role, role)):
            taken = [gpu for c in self.children if c.gpus is not None for gpu in c.gpus]
            try:
                (gpus,) = assign_gpus([tp * pp], visible_gpus(), taken)
            except ValueError as exc:
                raise RuntimeError(f"no {role} worker started: {exc}") from None
        names = {c.name for c in self.children}
        name = next(f"{role}-{i}" for i in range(len(names) + 1) if f"{role}-{i}" not in names)
        self._spawn(name, [role, "--config", str(self._config), "--instance-id", name, "--tp", str(tp),
                           "--pp", str(pp)], gpus=gpus)
        return name

    def _worker_gpus(self, roles: list[Role]) -> list[list[int] | None]:
        """Each worker's GPUs (tp each, none shared), or None for those on the CPU."""
        on_gpu = [role for role in roles if uses_gpus(self.settings, role)]
        if not on_gpu:
            return [None] * len(roles)
        visible = visible_gpus()
        if not visible:
            raise ValueError("device=cuda, but no NVIDIA GPU is visible here (CUDA_VISIBLE_DEVICES or the driver); "
                             "use device=cpu or auto")
        sets = iter(assign_gpus([self.settings.role(role).tp for role in on_gpu], visible))
        return [next(sets) if uses_gpus(self.settings, role) else None for role in roles]

    def retire(self, name: str, now: float) -> None:
        """The worker is draining (whoever drains it has told it): let it leave, do not restart it; past
        `drain_timeout_s` it gets SIGTERM (and hands what is left back to the gateway)."""
        child = next(c for c in self.children if c.name == name)
        child.retiring_since = now

    def _retired(self, child: Child, now: float) -> None:
        """A retiring child: dropped from the stack once it has left, stopped if it outlives the deadline."""
        if child.proc.poll() is not None:
            log.info("%s left (drained, exit code %d)", child.name, child.proc.returncode)
            self.children.remove(child)
            return
        assert child.retiring_since is not None
        if not child.terminated and now - child.retiring_since > self.drain_timeout_s:
            log.warning("%s still draining after %.0f s; stopping it (its requests move on)", child.name,
                        self.drain_timeout_s)
            child.proc.send_signal(signal.SIGTERM)
            child.terminated = True

    @property
    def url(self) -> str:
        return f"http://{self.settings.gateway.host}:{self.settings.gateway.port}"

    def _server(self, server: ServerProcess) -> ServerProcess:
        server.start()
        self.servers.append(server)
        self._server_restarts[server.name] = Restarts(time.monotonic())
        self._pin_server(server)
        log.info("%s listening on %s (pid %d, password required)", server.name, server.address, server.pid)
        return server

    def _pin_server(self, server: ServerProcess) -> None:
        if self.settings.service_cpus is not None and server.pid is not None:
            pin_process(server.pid, self.settings.service_cpus)

    def _spawn(self, name: str, args: list[str], cpus: list[int] | None = None,
               gpus: list[int] | None = None) -> None:
        self.children.append(Child(name, args, cpus, self._popen(name, args, cpus, gpus), Restarts(time.monotonic()),
                                   gpus))

    def _popen(self, name: str, args: list[str], cpus: list[int] | None,
               gpus: list[int] | None = None) -> subprocess.Popen[bytes]:
        env = {**os.environ, "DISTSERVE_LOG_LEVEL": self.log_level}
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        if cpus is not None:  # before the interpreter starts any thread: later ones inherit the CPUs
            pin_process(proc.pid, cpus)
        log.info("started %s (pid %d%s%s)", name, proc.pid, f", CPUs {cpus}" if cpus is not None else "",
                 f", GPUs {gpus}" if gpus is not None else "")
        return proc

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def wait_ready(self, timeout: float) -> None:
        """Until the gateway reports every worker alive; RuntimeError if a child dies first."""
        expected = len([c for c in self.children if c.name not in _SERVICES])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping:
            dead = self.dead_child()
            if dead is not None:
                raise RuntimeError(f"{dead.name} exited with code {dead.proc.returncode} during start-up")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                health = httpx.get(f"{self.url}/health", timeout=1.0).json()
                if sum(health.get("workers", {}).values()) >= expected:
                    return
            time.sleep(0.25)
        if not self.stopping:
            raise RuntimeError(f"the stack was not ready after {timeout:.0f} s")

    def watch(self) -> int:
        """Supervise until a signal (exit 0), or until a death the restart policy does not cover (exit 1)."""
        while not self.stopping:
            if not self.supervise(time.monotonic()):
                return 1
            time.sleep(0.25)
        return 0

    def supervise(self, now: float) -> bool:
        """One pass over the children and servers: schedule and make restarts, follow the plan
        (--autoscale); False: stop the stack."""
        if self.autoscaler is not None:
            try:
                self.autoscaler.tick(self, now)
            except (RuntimeError, TimeoutError) as exc:  # NATS unreachable now: the next pass tries again
                log.warning("scaling skipped: %s", exc)
        for child in list(self.children):
            if child.retiring_since is not None:
                self._retired(child, now)
                continue

            def respawn(child: Child = child) -> None:
                child.proc = self._popen(child.name, child.args, child.cpus, child.gpus)

            if not self._supervise_one(child.name, child.proc.pid, child.proc.poll(), child.state, respawn, now):
                return False
        for server in self.servers:
            def restart(server: ServerProcess = server) -> None:
                server.restart()
                self._pin_server(server)
                log.info("%s restarted on %s (pid %d)", server.name, server.address, server.pid)

            code = None if server.alive() else (server.proc.returncode if server.proc else -1)
            try:
                if not self._supervise_one(server.name, server.pid, code, self._server_restarts[server.name],
                                           restart, now):
                    return False
            except RuntimeError as exc:  # it did not come back
                log.error("%s", exc)
                return False
        return True

    def _supervise_one(self, name: str, pid: int | None, exit_code: int | None, state: Restarts,
                       start: Callable[[], None], now: float) -> bool:
        """Running (exit_code None): forget old restarts once stable. Dead: schedule its restart, or make it
        when due. False when the policy says stop the stack instead."""
        if exit_code is None:
            if state.restarts and now - state.started > _STABLE_S:
                state.restarts = 0
            return True
        if state.due is not None:
            if now >= state.due:
                state.restarts, state.due, state.started = state.restarts + 1, None, now
                start()
            return True
        how = f"{name} (pid {pid}) exited with code {exit_code}"
        if self.settings.restart == "never":
            log.error("%s; stopping the stack (restart: never)", how)
            return False
        if state.restarts >= self.settings.restart_limit:
            log.error("%s after %d restarts in a row; stopping the stack", how, state.restarts)
            return False
        delay = backoff_s(state.restarts)
        log.warning("%s; restarting it in %.1f s (restart %d of at most %d in a row)", how, delay,
                    state.restarts + 1, self.settings.restart_limit)
        state.due = now + delay
        return True

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def stop(self) -> None:
        """Gateway first (no new requests), then workers, then servers; each by its PID."""
        if self.autoscaler is not None:
            self.autoscaler.close()
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.proc.wait(timeout=_STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", child.name)
                child.proc.kill()
                child.proc.wait()
        for server in reversed(self.servers):
            server.stop()
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(stack_file().read_text()).get("pid") == os.getpid():
                stack_file().unlink()
        self._dir.cleanup()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s up %(levelname)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per health poll
    try:
        settings, plan = up_settings(args)
        check_counts(settings)
    except ValueError as exc:
        print(f"distserve up: {exc}", file=sys.stderr)
        return 2
    stack = Stack(settings, args.log_level.upper(), plan=plan)
    signal.signal(signal.SIGINT, stack.request_stop)
    signal.signal(signal.SIGTERM, stack.request_stop)
    try:
        stack.start()
        stack.wait_ready(_READY_TIMEOUT_S)
        if stack.stopping:
            return 0
        model = json.loads(httpx.get(f"{stack.url}/v1/models", timeout=5).text)["data"][0]["id"]
        print(f"\ndistserve is serving {model} at {stack.url}  (Ctrl-C stops it)\n"
              f"  curl {stack.url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"model\": \"{model}\", \"max_tokens\": 64, \"messages\": [{{\"role\": \"user\", "
              f"\"content\": \"What is the capital of France?\"}}]}}'\n"
              f"  metrics: {stack.url}/metrics   health: {stack.url}/health\n", flush=True)
        return stack.watch()
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        stack.stop()

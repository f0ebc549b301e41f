"""Faults across a real network: NATS and Redis, the gateway, a prefill and a decode worker each on a host
of its own (a network namespace; tests/services/netns.py), KV moving over plain TCP or UCX's TCP
transport between them. Delay and loss: every request completes. The prefill host's link cut while
decode pulls a request's KV: the pull fails, decode recomputes, the answer is the undisturbed one, and
the prefill worker rejoins once its link is back. Skipped only where namespaces cannot be made."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.config import REVEAL_SECRETS, load_settings
from shared.credentials import write_private
from shared.servers import NatsServer, RedisServer, ServerProcess, free_port, wait_for_port
from tests.services import netns
from tests.services.conftest import KV_GIB, PRECISION, request_states
from tests.services.test_stack import MODEL, kv_in_use, wait_until

pytestmark = pytest.mark.skipif((why := netns.available()) is not None, reason=str(why))

KEY = "sk-" + secrets.token_hex(8)
LONG_PROMPT = "Repeat after me: " + "the quick brown fox jumps over the lazy dog " * 120  # ~1200 tokens


def in_namespace(kind: type[ServerProcess], host: netns.Host) -> ServerProcess:
    class OnHost(kind):  # type: ignore[misc,valid-type]
        def command(self, port: int, data_dir: str) -> list[str]:
            return host.prefix + super().command(port, data_dir)

    server: ServerProcess = OnHost(host=host.ip, password=secrets.token_urlsafe(16))
    return server.start(port=free_port())  # any port is free in a fresh namespace


class Deployment:
    """The services on their hosts, started from one settings file, stopped by PID."""

    def __init__(self, net: netns.Network, transport: str, directory: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.servers: list[ServerProcess] = []
        try:  # a start that fails stops what it started: no process outlives the test
            self._start(net, transport, directory)
        except BaseException:
            self.stop()
            raise

    def _start(self, net: netns.Network, transport: str, directory: Path) -> None:
        self.hosts = {name: net.add_host(name) for name in ("infra", "gw", "pre", "dec")}
        self.servers.append(in_namespace(NatsServer, self.hosts["infra"]))
        self.servers.append(in_namespace(RedisServer, self.hosts["infra"]))
        self.redis_url = self.servers[1].url
        engine = {"kv_cache_memory_gib": KV_GIB, **PRECISION}
        settings = load_settings({
            "nats_url": self.servers[0].url, "redis_url": self.redis_url, "prefill": engine, "decode": engine,
            "worker": {"transport": transport, "dead_after_s": 1.5, "pull_timeout_s": 3.0},
            "gateway": {"host": self.hosts["gw"].ip, "port": 8000, "api_keys": [KEY]}})
        config = str(write_private(directory / "settings.json", settings.model_dump_json(context=REVEAL_SECRETS)))
        env = {**os.environ, "DISTSERVE_LOG_LEVEL": "WARNING", "UCX_TLS": "tcp,self", "UCX_NET_DEVICES": netns.DEVICE}
        for host, args in (("pre", ["prefill", "--instance-id", "prefill-0"]),
                           ("dec", ["decode", "--instance-id", "decode-0"]), ("gw", ["gateway"])):
            transfer = ["--transfer-host", self.hosts[host].ip] if host != "gw" else []
            self.procs.append(subprocess.Popen(
                [*self.hosts[host].prefix, sys.executable, "-m", "services.cli", *args, "--config", config, *transfer],
                env=env, stdin=subprocess.DEVNULL))
        self.url = f"http://{self.hosts['gw'].ip}:8000"
        wait_for_port(self.hosts["gw"].ip, 8000, 120, self.procs[-1])
        assert self.wait_healthy(300), "the deployment did not become ready"

    def wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        return False

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for server in self.servers:
            server.stop()


@pytest.fixture(params=["tcp", "ucx"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    net = netns.Network()
    try:
        started = Deployment(net, request.param, tmp_path)
        try:
            yield started
        finally:
            started.stop()
    finally:
        net.close()


def complete(url: str, prompt: str, max_tokens: int, cut: object = None) -> tuple[str, str]:
    """A greedy streamed completion: (its text, its request id). `cut` runs once the first token is in."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text = ""
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                if cut is not None and not text:
                    cut()  # type: ignore[operator]
                text += event["choices"][0]["text"]
        return text, response.headers["x-request-id"]


def test_a_cut_link_mid_transfer_is_recomputed_and_the_worker_rejoins(deployment: Deployment) -> None:
    undisturbed, _ = complete(deployment.url, LONG_PROMPT, 16)
    prefill = deployment.hosts["pre"]
    prefill.shape("tbf rate 20mbit burst 32kbit latency 400ms")  # the KV (~55 MB) takes seconds: cut it midway
    cut = lambda: (time.sleep(0.3), prefill.link(False))  # noqa: E731
    started = time.monotonic()
    text, request_id = complete(deployment.url, LONG_PROMPT, 16, cut)
    assert text == undisturbed and time.monotonic() - started < 60

    recorded = asyncio.run(request_states(deployment.redis_url, request_id))[0]
    assert recorded.get("kv_recomputed") == "1", recorded  # the pull failed; decode computed the KV itself

    prefill.link(True)
    prefill.shape(None)
    assert deployment.wait_healthy(30), "the prefill worker did not rejoin"
    assert complete(deployment.url, LONG_PROMPT, 16)[0] == undisturbed
    assert wait_until(lambda: kv_in_use(deployment.url) == 0.0)


@pytest.mark.skipif((no_netem := netns.netem_missing()) is not None, reason=str(no_netem))
def test_delay_and_loss_everywhere_every_request_completes(deployment: Deployment) -> None:
    for host in deployment.hosts.values():
        host.shape("netem delay 20ms 5ms loss 2%")
    texts = [complete(deployment.url, f"Count to {n}:", 8)[0] for n in range(3)]
    assert all(texts)

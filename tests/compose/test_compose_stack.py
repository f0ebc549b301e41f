"""The compose stack, built and run for real.

Builds the images offline (deploy/compose/offline/build.sh), starts NATS, Redis, the gateway, a prefill
worker, two decode workers, the planner and Prometheus with Docker Compose, and checks through the
published ports: chat and completions (streamed and not) with the `openai` client, greedy output equal to
the engine run in this process, KV moved between containers over UCX, Prometheus scraping every service,
every Grafana panel's query answered with data, and every phase's span leaving the containers over OTLP.
Everything it started (containers, network, images it tagged, the Docker engine if it started it) is
removed at the end.

Run by `make compose-test` (`.ci/run` runs it after `make test`), which sets DISTSERVE_COMPOSE_TEST=1 and
installs the engine; skipped otherwise, and where no Docker engine can run.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from shared.servers import free_port
from tests.services.test_stack import MODEL, PROMPT, greedy_in_process
from tests.services.test_tracing import PHASES, Collector

pytestmark = [
    pytest.mark.skipif(os.environ.get("DISTSERVE_COMPOSE_TEST") != "1",
                       reason="builds images and runs Docker: `make compose-test` runs it"),
    pytest.mark.timeout(1800),
]

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "deploy" / "compose"
TAG = f"compose-test-{os.getpid()}"
SUBNET = "172.28.0.0/24"
WORKERS = {"prefill": 1, "decode": 2}


def log(message: str) -> None:
    print(f"[compose-test {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def docker(*args: str, check: bool = True, timeout: float = 600) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def wait_for(what: str, probe: object, timeout: float, interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


@pytest.fixture(scope="module")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A Docker engine: the one already running, else dockerd started here (as root) and stopped by PID.

    One started here leaves the host's firewall alone (`--iptables=false`: no FORWARD policy of DROP, no
    br_netfilter hook, which would cut the network-namespace tests' bridged links); published ports go
    through docker-proxy, and containers reach each other on their own bridge."""
    if shutil.which("docker") is None or shutil.which("dockerd") is None:
        pytest.skip("no Docker engine here (`make compose-test` installs Debian's docker.io as root)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("no Docker engine runs and starting dockerd needs root")
    log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    had_bridge = Path("/sys/class/net/docker0").exists()
    with log_path.open("w") as log_file:
        daemon = subprocess.Popen(["dockerd", "--iptables=false", "--ip-masq=false"], stdout=log_file,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("dockerd", lambda: subprocess.run(["docker", "info"], capture_output=True).returncode == 0, 60)
    except TimeoutError:
        daemon.terminate()
        daemon.wait(30)
        pytest.skip(f"dockerd did not start here: {log_path.read_text()[-1000:]}")
    log(f"started dockerd (pid {daemon.pid})")
    yield
    daemon.terminate()
    daemon.wait(60)
    if not had_bridge:  # the default bridge it made outlives it
        subprocess.run(["ip", "link", "delete", "docker0"], capture_output=True)


@pytest.fixture(scope="module")
def images(docker_engine: None) -> Iterator[dict[str, str]]:
    """The offline build, tagged for this run; removed afterwards with every layer it left behind."""
    before = set(docker("images", "-aq").split())
    base_existed = bool(docker("images", "-q", "distserve-base:bookworm").strip())
    names = {"DISTSERVE_IMAGE": f"distserve:{TAG}", "PROMETHEUS_IMAGE": f"distserve-prometheus:{TAG}",
             "BASE_IMAGE": "distserve-base:bookworm"}
    started = time.monotonic()
    try:
        subprocess.run([str(COMPOSE / "offline" / "build.sh")], env={**os.environ, **names,
                       "PYTHON": sys.executable}, check=True, timeout=1200)
        log(f"images built in {time.monotonic() - started:.0f} s")
        yield names
    finally:
        tagged = [names["DISTSERVE_IMAGE"], names["PROMETHEUS_IMAGE"]] + ([] if base_existed else [names["BASE_IMAGE"]])
        docker("rmi", "-f", *tagged, check=False)
        left = set(docker("images", "-aq").split()) - before
        if left:
            docker("rmi", "-f", *left, check=False)


@dataclass
class Stack:
    url: str
    prometheus: str
    api_key: str
    collector: Collector


def compose_command() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor `docker-compose` is installed")


@pytest.fixture(scope="module")
def stack(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    env_file.write_text(subprocess.run([sys.executable, str(COMPOSE / "make_env.py")], capture_output=True,
                                       text=True, check=True).stdout)
    secrets = dict(line.split("=", 1) for line in env_file.read_text().split())
    # The bridge's address on this host: containers reach the test's OTLP receiver there, nothing else does.
    ipam = json.loads(docker("network", "inspect", "bridge"))[0]["IPAM"]["Config"][0]
    bridge = ipam.get("Gateway") or str(next(ipaddress.ip_network(ipam["Subnet"]).hosts()))
    collector = Collector(bridge).start()
    gateway_port, prometheus_port = free_port(), free_port()
    env = {**os.environ, **images, "GATEWAY_PORT": str(gateway_port), "PROMETHEUS_PORT": str(prometheus_port),
           "OTLP_ENDPOINT": collector.endpoint, "COMPOSE_SUBNET": SUBNET}
    compose = [*compose_command(), "-p", f"distserve-{TAG}", "--env-file", str(env_file),
               "-f", str(COMPOSE / "docker-compose.yml"), "-f", str(COMPOSE / "docker-compose.offline.yml")]

    def run(*args: str, check: bool = True) -> str:
        done = subprocess.run([*compose, *args], env=env, capture_output=True, text=True, timeout=600)
        if check and done.returncode:
            raise RuntimeError(f"compose {' '.join(args)}: {done.stderr.strip()[-2000:]}")
        return done.stdout

    started = time.monotonic()
    try:
        run("up", "-d", "--no-build", *(f"--scale={role}={n}" for role, n in WORKERS.items()))
        url = f"http://127.0.0.1:{gateway_port}"
        wait_for("the gateway's health with every worker",
                 lambda: httpx.get(f"{url}/health", timeout=2).json()["workers"] == {**WORKERS, "colocated": 0},
                 300)
        log(f"stack healthy in {time.monotonic() - started:.0f} s")
        yield Stack(url, f"http://127.0.0.1:{prometheus_port}", secrets["DISTSERVE_API_KEY"], collector)
    except BaseException:
        log("compose logs:\n" + run("logs", "--tail", "40", check=False)[-8000:])
        raise
    finally:
        started = time.monotonic()
        run("down", "-v", "--remove-orphans", "--timeout", "20", check=False)
        collector.stop()
        log(f"stack removed in {time.monotonic() - started:.0f} s")


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.api_key, max_retries=0, timeout=120)


def test_the_api_needs_the_key(stack: Stack) -> None:
    wrong = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert [m.id for m in client(stack).models.list().data] == [MODEL]


def test_chat_and_completions_streamed_and_not(stack: Stack) -> None:
    api = client(stack)
    reply = api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.completion_tokens > 1
    chunks = list(api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage == reply.usage
    pieces = [c.choices[0].text for c in api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                                                  temperature=0, stream=True)]
    whole = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert "".join(pieces) == whole.choices[0].text
    assert whole.usage is not None and whole.usage.completion_tokens == 12


def test_greedy_output_equals_the_engine_in_this_process(stack: Stack) -> None:
    prompts = ["def fibonacci(n):", "Write a haiku about the sea."]
    for prompt, expected in zip(prompts, greedy_in_process(prompts, 16), strict=True):
        got = client(stack).completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert got.choices[0].text == expected


def query(stack: Stack, expr: str) -> list[dict[str, object]]:
    answer = httpx.get(f"{stack.prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]  # type: ignore[no-any-return]


def has_data(result: list[dict[str, object]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)  # type: ignore[index]


def test_prometheus_scrapes_every_service_and_every_panel_has_data(stack: Stack) -> None:
    targets = httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    jobs = sorted(t["labels"]["job"] for t in targets)
    assert jobs == ["distserve-gateway", "distserve-planner", *["distserve-workers"] * sum(WORKERS.values())]

    def down() -> list[str]:
        targets = httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return [f"{t['scrapeUrl']}: {t['lastError']}" for t in targets if t["health"] != "up"]

    with contextlib.suppress(TimeoutError):
        wait_for("every target up", lambda: not down(), 30)
    assert not down()
    # Two waves of traffic a few scrapes apart, so every rate() over the last minute sees a change.
    api = client(stack)
    for _ in range(2):
        for prompt in ("Hello", "Name three fruits.", "Count to five."):
            api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=8)
        time.sleep(12)
    by_instance = query(stack, "distserve_step_duration_seconds_count")
    assert {r["metric"]["role"] for r in by_instance} == {"prefill", "decode"}  # type: ignore[index]
    assert len({r["metric"]["instance"] for r in by_instance}) == sum(WORKERS.values())  # type: ignore[index]
    moved = query(stack, 'distserve_kv_transfer_bytes_total{transport="ucx"}')
    assert has_data(moved) and float(moved[0]["value"][1]) > 0  # type: ignore[index]
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "distserve.json").read_text())
    empty = [f"{panel['title']}: {target['expr']}" for panel in dashboard["panels"] for target in panel["targets"]
             if not has_data(query(stack, target["expr"]))]
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_every_phase_span_leaves_the_containers(stack: Stack) -> None:
    client(stack).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)

    def complete_trace() -> bool:
        with stack.collector.lock:
            spans = list(stack.collector.spans)
        traces: dict[bytes, set[tuple[str, str]]] = {}
        for service, name, trace, _, _ in spans:
            traces.setdefault(trace, set()).add((service, name))
        return any({name for _, name in t} == PHASES and {s for s, _ in t} ==
                   {"distserve-gateway", "distserve-prefill", "distserve-decode"} for t in traces.values())

    wait_for("a request's trace with every phase, from all three services", complete_trace, 30)

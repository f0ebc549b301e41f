"""The compose deployment stays in step with the code: its commands parse, its dashboard's metrics exist.

Fast static checks for every test run; tests/compose runs the stack itself (`make compose-test`).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.cli import build_parser
from services.gateway.metrics import GatewayMetrics
from services.gateway.registry import Registry
from services.worker.metrics import WorkerMetrics
from shared import protocol as p
from shared.config import load_settings
from shared.engine.api import EngineStats, StepRecord

COMPOSE = Path(__file__).parents[2] / "deploy" / "compose"


def _services() -> dict[str, dict[str, object]]:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]  # type: ignore[no-any-return]


def test_every_distserve_command_parses() -> None:
    parser = build_parser()
    checked = 0
    for service in _services().values():
        if not str(service.get("image", "")).endswith("distserve:latest}"):
            continue
        if "command" in service:
            parser.parse_args(service["command"])  # type: ignore[arg-type]
            checked += 1
        elif "entrypoint" in service:
            script = service["entrypoint"][-1]  # type: ignore[index]
            script = re.sub(r"\$\$\([^)]*\)", "x", script)  # $(hostname) and the like
            parser.parse_args(shlex.split(script.removeprefix("exec distserve ")))
            checked += 1
    assert checked == 4  # gateway, prefill, decode, planner


def _interpolated(value: str, env: dict[str, str]) -> str:
    """Compose's ${NAME:?message} with the values of a .env."""
    return re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: env[m.group(1)], value)


def test_environment_is_valid_settings_with_credentials_from_env(monkeypatch: object) -> None:
    dotenv = dict(line.split("=", 1) for line in subprocess.run(
        [sys.executable, str(COMPOSE / "make_env.py")], capture_output=True, text=True, check=True).stdout.split())
    assert set(dotenv) == {"DISTSERVE_API_KEY", "NATS_PASSWORD", "REDIS_PASSWORD"}
    committed = (COMPOSE / "docker-compose.yml").read_text()
    assert not any(secret in committed for secret in dotenv.values())
    services = _services()
    for service in ("gateway", "prefill"):
        for key, value in services[service]["environment"].items():  # type: ignore[attr-defined]
            monkeypatch.setenv(key, _interpolated(value, dotenv))  # type: ignore[attr-defined]
        settings = load_settings()
        assert settings.nats_url == f"nats://distserve:{dotenv['NATS_PASSWORD']}@nats:4222"
        assert settings.redis_url == f"redis://:{dotenv['REDIS_PASSWORD']}@redis:6379/0"
        assert settings.telemetry.exporter == "otlp"
    gateway = load_settings({"gateway": {"host": "0.0.0.0"}}).gateway  # the compose gateway's own address
    assert [k.get_secret_value() for k in gateway.api_keys] == [dotenv["DISTSERVE_API_KEY"]]
    nats_command = " ".join(services["nats"]["command"])  # type: ignore[arg-type]
    assert "--pass ${NATS_PASSWORD" in nats_command
    assert "${REDIS_PASSWORD" in " ".join(services["redis"]["command"])  # type: ignore[arg-type]


def test_dashboard_queries_only_metrics_the_gateway_and_workers_export() -> None:
    registry = Registry(3.0)
    registry.update(p.WorkerInfo(instance_id="w", role="prefill", model="m", max_model_len=1, pid=1, host="h",
                                 started_at=0, load=p.WorkerLoad(total_blocks=1)))
    gateway = GatewayMetrics(registry)
    gateway.ttft.observe(0.1)
    gateway.kv_transfer.labels(transport="tcp").observe(0.01)
    gateway.requests.labels(outcome="ok").inc()
    stats = EngineStats(num_waiting=0, num_running=1, num_held=0, free_blocks=3, total_blocks=4,
                        queued_prompt_tokens=0)
    worker = WorkerMetrics("w", "prefill", lambda: stats)
    worker.observe_steps([StepRecord(ended=1.0, seconds=0.01, prefill_lengths=(5,), decode_batch=0,
                                     decode_context=0)])
    exported = {name for r in (gateway.registry, worker.registry)
                for name in re.findall(r"^(distserve_\w+?)(?:\{| )", generate_latest(r).decode(), re.M)}
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "distserve.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"distserve_\w+", target["expr"])}
    assert queried and queried <= exported, queried - exported


def test_worker_metrics_describe_steps_batches_and_kv_usage() -> None:
    stats = EngineStats(num_waiting=2, num_running=3, num_held=1, free_blocks=3, total_blocks=4,
                        queued_prompt_tokens=7)
    worker = WorkerMetrics("d-0", "decode", lambda: stats)
    worker.observe_steps([StepRecord(ended=1.0, seconds=0.02, prefill_lengths=(), decode_batch=3, decode_context=30),
                          StepRecord(ended=2.0, seconds=0.3, prefill_lengths=(8, 4), decode_batch=2,
                                     decode_context=9)])
    worker.observe_queue_time(0.25)
    samples = {(s.name, s.labels.get("phase")): s.value
               for family in text_string_to_metric_families(generate_latest(worker.registry).decode())
               for s in family.samples if s.labels.get("instance") == "d-0" and s.labels.get("role") == "decode"}
    assert samples["distserve_step_duration_seconds_count", "decode"] == 1
    assert samples["distserve_step_duration_seconds_count", "mixed"] == 1
    assert samples["distserve_step_batch_tokens_sum", None] == 17  # 3, then 8 + 4 + 2
    assert samples["distserve_step_batch_requests_sum", None] == 7  # 3, then 2 + 2
    assert samples["distserve_request_queue_time_seconds_sum", None] == 0.25
    assert samples["distserve_kv_cache_usage_ratio", None] == 0.25
    assert samples["distserve_num_requests_running", None] == 3


def test_prometheus_scrapes_the_gateway_every_worker_and_the_planner() -> None:
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["distserve-gateway"]["static_configs"][0]["targets"] == ["gateway:8000"]
    workers = jobs["distserve-workers"]["dns_sd_configs"][0]
    services = _services()
    assert set(workers["names"]) == {"prefill", "decode"}
    port = services["prefill"]["environment"]["DISTSERVE_WORKER__METRICS_PORT"]  # type: ignore[index]
    assert workers["port"] == int(port)
    planner = services["planner"]["command"]  # type: ignore[index]
    assert jobs["distserve-planner"]["static_configs"][0]["targets"] == [
        f"planner:{planner[planner.index('--metrics-port') + 1]}"]  # type: ignore[union-attr]


def test_the_installed_package_carries_every_data_file() -> None:
    """The image installs the package (not the checkout): every tracked non-Python file under shared/ and
    services/ must be package data, or the containers miss it (the planner's profiles, the C++ sources)."""
    root = COMPOSE.parents[1]
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    tracked = subprocess.run(["git", "ls-files", "shared", "services"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.split()
    patterns = [Path(package.replace(".", "/"), glob) for package, globs in package_data.items() for glob in globs]
    missing = [path for path in map(Path, tracked) if path.suffix != ".py" and not any(
        path.parent == pattern.parent and fnmatch.fnmatch(path.name, pattern.name) for pattern in patterns)]
    assert not missing

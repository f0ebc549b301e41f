"""The compose deployment stays in step with the code: its commands parse, its dashboard's metrics exist.

No Docker engine runs here, so the files are checked, not run.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from services.cli import build_parser
from services.gateway.metrics import GatewayMetrics
from services.gateway.registry import Registry
from shared import protocol as p
from shared.config import load_settings

COMPOSE = Path(__file__).parents[2] / "deploy" / "compose"


def _services() -> dict[str, dict[str, object]]:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]  # type: ignore[no-any-return]


def test_every_distserve_command_parses() -> None:
    parser = build_parser()
    checked = 0
    for service in _services().values():
        if "command" in service and service.get("image") == "distserve:latest":
            parser.parse_args(service["command"])  # type: ignore[arg-type]
            checked += 1
        elif "entrypoint" in service and service.get("image") == "distserve:latest":
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


def test_dashboard_queries_only_metrics_the_gateway_exports() -> None:
    registry = Registry(3.0)
    registry.update(p.WorkerInfo(instance_id="w", role="prefill", model="m", max_model_len=1, pid=1, host="h",
                                 started_at=0, load=p.WorkerLoad(total_blocks=1)))
    metrics = GatewayMetrics(registry)
    metrics.ttft.observe(0.1)
    metrics.kv_transfer.labels(transport="tcp").observe(0.01)
    metrics.requests.labels(outcome="ok").inc()
    exported = set(re.findall(r"^(distserve_\w+?)(?:\{| )", generate_latest(metrics.registry).decode(), re.M))
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "distserve.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"distserve_\w+", target["expr"])}
    assert queried and queried <= exported, queried - exported

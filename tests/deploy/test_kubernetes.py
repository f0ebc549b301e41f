"""The Kubernetes manifests: valid against the Kubernetes API schemas (offline, strict), wired together
(selectors, Services, probes), every secret from the Secret, and every distserve command parses."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.cli import build_parser

MANIFESTS = Path(__file__).parents[2] / "deploy" / "k8s" / "distserve.yaml"
KUBERNETES = "1.30"


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]


def containers(kind: str = "Deployment") -> list[tuple[str, dict[str, Any]]]:
    return [(d["metadata"]["name"], c) for d in documents() if d["kind"] == kind
            for c in d["spec"]["template"]["spec"]["containers"]]


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_is_valid_against_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_services_select_deployments_and_deployments_select_their_pods() -> None:
    docs = documents()
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs
            if d["kind"] == "Deployment"}
    for d in docs:
        if d["kind"] == "Deployment":
            assert d["spec"]["selector"]["matchLabels"].items() <= pods[d["metadata"]["name"]].items()
        if d["kind"] == "Service":
            selected = [name for name, labels in pods.items() if d["spec"]["selector"].items() <= labels.items()]
            assert len(selected) == 1, d["metadata"]["name"]
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert {"nats", "redis", "distserve"} <= names  # what the URLs and clients name
    for role in ("prefill", "decode"):
        assert f"distserve-{role}" in pods  # scaled independently: a Deployment each


def test_secrets_come_from_the_secret_and_variables_are_defined_before_use() -> None:
    for name, container in containers():
        defined: set[str] = set()
        for var in container.get("env", []):
            for used in re.findall(r"\$\((\w+)\)", var.get("value", "")):
                assert used in defined, f"{name}: {var['name']} uses $({used}) before it is defined"
            if re.search(r"PASSWORD|API_KEYS", var["name"]) and "value" in var:
                assert "$(" in var["value"], f"{name}: {var['name']} has a literal secret"
            defined.add(var["name"])
        for arg in container.get("args", []):
            for used in re.findall(r"\$\((\w+)\)", arg):
                assert used in defined, f"{name}: an argument uses $({used}), which is not defined"
        assert container["resources"]["requests"], name


def test_the_gateway_is_probed_on_health_and_workers_pull_from_their_pod_address() -> None:
    by_name = dict(containers())
    assert by_name["distserve-gateway"]["readinessProbe"]["httpGet"]["path"] == "/health"
    for role in ("prefill", "decode"):
        args = by_name[f"distserve-{role}"]["args"]
        assert args[0] == role and args[args.index("--transfer-host") + 1] == "$(POD_IP)"


def test_every_distserve_command_parses() -> None:
    parser = build_parser(with_bench=False)
    commands = [c["args"] for _, c in containers() if c["image"] == "distserve:latest"]
    assert len(commands) == 4
    for args in commands:
        parser.parse_args([re.sub(r"\$\((\w+)\)", "x", a) for a in args])

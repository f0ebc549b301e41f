"""Authentication: API keys at the gateway, passwords on the embedded NATS and Redis, no secret in logs.

The gateway here is the real app on the session's nats-server with no workers: what it answers
before any worker is involved is exactly what authentication decides.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient
from nats.errors import Error as NatsError
from pydantic import ValidationError
from redis.exceptions import AuthenticationError

from services.gateway.app import create_app
from shared.config import REVEAL_SECRETS, Settings, load_settings
from shared.credentials import redact
from shared.servers import NatsServer, RedisServer

KEY = "sk-test-0123456789abcdef"


@pytest.fixture
def gateway(nats_server: NatsServer, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    options: dict[str, Any] = getattr(request, "param", {})
    settings = load_settings({"nats_url": nats_server.url, "gateway": {"api_keys": [KEY], **options}})
    with TestClient(create_app(settings)) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_key_is_required_and_checked(gateway: TestClient) -> None:
    missing = gateway.get("/v1/models")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "missing_api_key"
    wrong = gateway.post("/v1/completions", headers=bearer("sk-wrong"), json={"model": "m", "prompt": "hi"})
    assert wrong.status_code == 401
    assert wrong.json()["error"] == {"message": "incorrect API key", "type": "invalid_request_error",
                                     "param": None, "code": "invalid_api_key"}
    assert gateway.get("/v1/models", headers={"Authorization": KEY}).status_code == 401  # no scheme
    assert gateway.get("/v1/models", headers=bearer(KEY)).status_code == 200
    # past authentication, the request meets the service as it is: no workers yet
    unserved = gateway.post("/v1/completions", headers=bearer(KEY), json={"model": "SmolLM2-135M-Instruct",
                                                                          "prompt": "hi"})
    assert unserved.status_code == 503
    assert gateway.get("/health").status_code == 503  # open by default (probes carry no key): not 401
    metrics = gateway.get("/metrics")
    assert metrics.status_code == 200 and KEY not in metrics.text


@pytest.mark.parametrize("gateway", [{"auth_health_metrics": True}], indirect=True)
def test_health_and_metrics_can_require_a_key(gateway: TestClient) -> None:
    assert gateway.get("/metrics").status_code == 401
    assert gateway.get("/health").status_code == 401
    assert gateway.get("/metrics", headers=bearer(KEY)).status_code == 200


def test_keys_from_a_file(nats_server: NatsServer, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\nsk-one\n\n  sk-two  \n")
    settings = load_settings({"nats_url": nats_server.url, "gateway": {"api_keys_file": str(keys)}})
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/models", headers=bearer("sk-two")).status_code == 200
        assert client.get("/v1/models", headers=bearer("# one key per line")).status_code == 401
    keys.write_text("# none\n")
    with pytest.raises(ValueError, match="no API keys"):
        create_app(settings)


def test_beyond_loopback_the_gateway_needs_keys() -> None:
    with pytest.raises(ValidationError, match="beyond loopback"):
        load_settings({"gateway": {"host": "0.0.0.0"}})
    for host in ("127.0.0.1", "localhost", "::1"):
        load_settings({"gateway": {"host": host}})
    load_settings({"gateway": {"host": "0.0.0.0", "api_keys": [KEY]}})
    load_settings({"gateway": {"host": "0.0.0.0", "allow_unauthenticated": True}})


def test_keys_are_hidden_except_in_the_private_settings_file() -> None:
    settings = load_settings({"gateway": {"api_keys": [KEY]}})
    assert KEY not in repr(settings) and KEY not in settings.model_dump_json()
    revealed = settings.model_dump_json(context=REVEAL_SECRETS)
    assert KEY in revealed
    assert Settings.model_validate_json(revealed).gateway.api_keys[0].get_secret_value() == KEY


async def test_embedded_nats_and_redis_refuse_clients_without_the_password() -> None:
    with NatsServer.with_password() as server:
        assert server.password and server.password not in server.address
        with pytest.raises((NatsError, OSError)):
            await nats.connect(server.address, max_reconnect_attempts=0, allow_reconnect=False,
                               connect_timeout=2)
        client = await nats.connect(server.url)
        await client.close()
    with RedisServer.with_password() as server:
        anonymous = aioredis.from_url(server.address)
        with pytest.raises(AuthenticationError):
            await anonymous.ping()
        await anonymous.aclose()
        client = aioredis.from_url(server.url)
        assert await client.ping()
        await client.aclose()


def test_urls_are_logged_without_credentials(caplog: pytest.LogCaptureFixture) -> None:
    assert redact("nats://distserve:s3cret@127.0.0.1:4222") == "nats://***@127.0.0.1:4222"
    assert redact("redis://:s3cret@10.0.0.2:6379/0") == "redis://***@10.0.0.2:6379/0"
    assert redact("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    caplog.set_level(logging.INFO)
    from services.launcher import Stack  # the launcher's server log lines

    stack = Stack(load_settings({}), announce=False)
    server = stack._server(NatsServer.with_password())
    try:
        assert server.password is not None
        assert "listening on nats://127.0.0.1" in caplog.text and server.password not in caplog.text
    finally:
        server.stop()

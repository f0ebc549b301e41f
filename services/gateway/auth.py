"""API keys: who may use the gateway.

Clients send ``Authorization: Bearer KEY`` (what the OpenAI clients send with ``api_key=KEY``). Keys
come from the settings (``gateway.api_keys``, e.g. the environment) and from ``gateway.api_keys_file``,
one per line. With no keys the gateway is open, which the settings allow only on loopback or when
asked to explicitly (`GatewaySettings`). /health and /metrics stay open unless
``gateway.auth_health_metrics``: probes and Prometheus usually carry no key.
"""

from __future__ import annotations

import hmac

from services.gateway.errors import APIError
from shared.config import GatewaySettings

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class APIKeys:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> APIKeys:
        keys = [k.get_secret_value() for k in settings.api_keys]
        if settings.api_keys_file is not None:
            lines = settings.api_keys_file.read_text().splitlines()
            from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not from_file:
                raise ValueError(f"no API keys in {settings.api_keys_file}")
            keys += from_file
        return cls([k for k in keys if k])

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Return if the header carries a valid key (or none is required), else raise a 401."""
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "no API key given: send 'Authorization: Bearer YOUR_KEY'", code="missing_api_key",
                           headers=_CHALLENGE)
        given = token.strip().encode()
        valid = False
        for key in self._keys:  # every key compared, in constant time: no timing tells which one nearly matched
            valid |= hmac.compare_digest(given, key)
        if not valid:
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers=_CHALLENGE)

"""The gateway's OpenAPI schema, fuzzed with schemathesis against a real stack: valid and invalid bodies
alike, no 5xx, and every error in OpenAI's shape. Bounded (examples per operation, tokens per answer)
so that it stays a few tens of seconds. It found the engine's NaN probabilities at temperature 1e-310
and the document's broken references to nested body models."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from services.launcher import Stack
from tests.services.test_stack import MODEL

EXAMPLES = 40
MAX_TOKENS = 8  # generation is real: cap what a drawn body asks for


def capped(body: Any) -> Any:
    """The drawn body, for the model served here (else most would stop at 404) with a few tokens at most."""
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = MODEL
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, bool):
                continue
            try:  # the API takes 2048, 2048.0 and "2048" alike: cap them all
                if float(value) > MAX_TOKENS:  # type: ignore[arg-type]
                    body[key] = MAX_TOKENS
            except (TypeError, ValueError, OverflowError):
                continue
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = MAX_TOKENS  # else the rest of the context: thousands of tokens
    return body


def check(case: schemathesis.Case) -> None:
    case.body = capped(case.body)
    response = case.call(timeout=30)  # a capped answer takes seconds
    assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error


def test_no_server_errors_and_every_error_in_openai_shape(stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    for operation in operations:
        # Bodies valid by the schema and invalid ones; the GET routes take no input to make invalid.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method == "post" else [])
        for mode in modes:
            # The same examples every run (CI stays reproducible and bounded), and no shrinking: a failing
            # example is reported as found (shrinking one that times out took over five minutes).
            run = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                           phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))(
                given(case=operation.as_strategy(generation_mode=mode))(check))
            run()

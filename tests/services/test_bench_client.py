"""The overhead bench's thin HTTP client against a real gateway: one stream after another on one
kept-alive connection, first token stamped within the request, errors raised with their status."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import pytest

from services.bench.overhead import one_request
from services.launcher import Stack
from tests.services.test_stack import MODEL, PROMPT


def test_streams_on_one_kept_alive_connection(stack: Stack) -> None:
    address = urlsplit(stack.url)
    with socket.create_connection((address.hostname, address.port), timeout=60) as sock:
        ids = []
        for _ in range(2):
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
            request_id, sent, first, end, _ = one_request(sock, body)
            assert sent < first <= end
            ids.append(request_id)
        assert all(i.startswith("cmpl-") for i in ids) and ids[0] != ids[1]
        with pytest.raises(RuntimeError, match="HTTP 400"):
            one_request(sock, {"model": MODEL, "prompt": "", "stream": True})

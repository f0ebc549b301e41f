"""One trace per request across the gateway and both workers, exported over OTLP/HTTP.

The collector is a real HTTP server on loopback that decodes the OTLP protobuf the services send.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from shared.servers import NatsServer, RedisServer
from tests.services.conftest import start_stack
from tests.services.test_stack import MODEL, PROMPT

PHASES = {"gateway", "prefill queue", "prefill compute", "kv transfer", "decode queue", "decode"}


class Collector(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver on `host` (loopback; the compose test binds the Docker bridge's address)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), _Handler)
        self.spans: list[tuple[str, str, bytes, bytes, bytes]] = []  # service, name, trace, span, parent
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}/v1/traces"

    def start(self) -> Collector:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:  # noqa: N802 (the http.server API)
        request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            for resource in request.resource_spans:
                service = next(a.value.string_value for a in resource.resource.attributes if a.key == "service.name")
                for scope in resource.scope_spans:
                    self.server.spans += [(service, s.name, s.trace_id, s.span_id, s.parent_span_id)
                                          for s in scope.spans]
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector().start()
    yield server
    server.stop()


def test_every_phase_is_a_span_of_the_request_trace(redis_server: RedisServer, collector: Collector) -> None:
    with NatsServer() as nats:
        stack = start_stack(nats, redis_server, telemetry={"exporter": "otlp", "otlp_endpoint": collector.endpoint})
        try:
            api = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=120)
            api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
        finally:
            stack.stop()  # flushes every service's exporter
    roots = [s for s in collector.spans if s[1] == "gateway"]
    assert len(roots) == 1
    _, _, trace_id, root_id, _ = roots[0]
    spans = {(service, name): parent for service, name, trace, _, parent in collector.spans if trace == trace_id}
    assert {name for _, name in spans} == PHASES
    assert all(parent == root_id for (_, name), parent in spans.items() if name != "gateway")
    assert {service for service, _ in spans} == {"distserve-gateway", "distserve-prefill", "distserve-decode"}

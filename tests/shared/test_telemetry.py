"""One trace per request: worker phases recorded from NATS headers become children of the root span."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.config import TelemetrySettings
from shared.telemetry import Tracing, end_span, extract_context, inject_headers, span_context


def test_phase_spans_join_the_gateway_trace_through_headers() -> None:
    exporter = InMemorySpanExporter()
    gateway = Tracing(TelemetrySettings(), "gateway", exporter=exporter)
    worker = Tracing(TelemetrySettings(), "prefill", exporter=exporter)

    root = gateway.start("request", 10.0, attributes={"request_id": "r1"})
    headers = inject_headers(span_context(root))
    assert headers is not None and "traceparent" in headers

    parent = extract_context(headers)  # what the worker sees on its NATS message
    worker.record("prefill queue", 10.001, 10.002, parent)
    worker.record("prefill compute", 10.002, 10.050, parent, {"tokens": 12})
    end_span(root, 10.3)

    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"request", "prefill queue", "prefill compute"}
    trace_id = spans["request"].context.trace_id
    for name in ("prefill queue", "prefill compute"):
        assert spans[name].context.trace_id == trace_id
        parent_span = spans[name].parent
        assert parent_span is not None and parent_span.span_id == spans["request"].context.span_id
    assert spans["prefill compute"].end_time - spans["prefill compute"].start_time == 48_000_000


def test_tracing_off_costs_nothing_and_sends_no_headers() -> None:
    tracing = Tracing(TelemetrySettings(exporter="none"), "gateway")
    root = tracing.start("request", 1.0)
    assert not tracing.enabled
    assert inject_headers(span_context(root)) is None
    assert extract_context(None) is None and extract_context({"x": "y"}) is None

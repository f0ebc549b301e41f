"""OpenTelemetry for the stack: one trace per request, one span per phase, across processes.

The gateway opens the request's root span and puts its context in the NATS headers of the
messages it sends (W3C `traceparent`). Workers record their phases as child spans with explicit
start and end times: a phase is known by its timestamps (the same ones written to Redis), so no
span object has to live across threads or messages.

Exporter: ``none`` (no tracing cost), ``console`` (stdout) or ``otlp`` (OTLP/HTTP endpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.config import TelemetrySettings

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
AttributeValue = str | bool | int | float


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Tracing:
    """Tracer of one service process; `exporter` overrides the configured one (tests)."""

    def __init__(self, settings: TelemetrySettings, service: str,
                 exporter: SpanExporter | None = None) -> None:
        self.provider: TracerProvider | None = None
        if exporter is None and settings.exporter == "none":
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if exporter is not None:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif settings.exporter == "console":
            self.provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
        self.tracer = self.provider.get_tracer("distserve")

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def start(self, name: str, start_time: float, parent: Context | None = None,
              attributes: Mapping[str, AttributeValue] | None = None) -> trace.Span:
        return self.tracer.start_span(name, context=parent, start_time=_ns(start_time),
                                      attributes=dict(attributes or {}))

    def record(self, name: str, start_time: float, end_time: float, parent: Context | None,
               attributes: Mapping[str, AttributeValue] | None = None) -> None:
        """A finished phase as a span (no-op when tracing is off or there is no parent)."""
        if self.provider is None or parent is None:
            return
        span = self.start(name, start_time, parent, attributes)
        span.end(end_time=_ns(end_time))

    def shutdown(self) -> None:
        if self.provider is not None:
            try:
                self.provider.shutdown()
            except Exception as exc:  # an unreachable collector must not break shutdown
                log.warning("trace exporter shutdown failed: %s", exc)


def end_span(span: trace.Span, end_time: float, error: str | None = None) -> None:
    if error is not None:
        span.set_status(trace.Status(trace.StatusCode.ERROR, error))
    span.end(end_time=_ns(end_time))


def span_context(span: trace.Span) -> Context:
    return trace.set_span_in_context(span)


def inject_headers(context: Context | None) -> dict[str, str] | None:
    """The W3C trace headers of a context, for a NATS message (None if there is no trace)."""
    if context is None:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier or None


def extract_context(headers: Mapping[str, str] | None) -> Context | None:
    """The trace context a NATS message carried, or None."""
    if not headers or "traceparent" not in headers:
        return None
    return _PROPAGATOR.extract(dict(headers))

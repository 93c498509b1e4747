"""OpenTelemetry tracing: one tracer provider per process, exporter chosen by settings."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased


def configure_tracing(
    service: str, exporter: str = "none", endpoint: str = "", *, record: bool | None = None
) -> TracerProvider:
    """Install (once per process) and return the tracer provider.

    Every request gets a span context, so trace ids exist for log correlation and are propagated to
    downstream services whatever the exporter. Spans are only *recorded* (attributes, timings) when they
    go somewhere: with ``exporter="none"`` new traces are not sampled, which spares each RPC the cost of a
    recording span (measurable on the serving hot path), while a caller's sampled trace is still honoured.
    ``record`` overrides that choice (tests record in memory).
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        # A process hosts one service; tests host several and share the first provider.
        return current
    sampled = exporter != "none" if record is None else record
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"maas-{service}"}),
        sampler=ParentBased(ALWAYS_ON if sampled else ALWAYS_OFF),
    )
    span_exporter: SpanExporter | None = None
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    if span_exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    return provider

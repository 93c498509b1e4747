"""OpenTelemetry tracing: one tracer provider per process, exporter chosen by settings."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter


def configure_tracing(service: str, exporter: str = "none", endpoint: str = "") -> TracerProvider:
    """Install (once per process) and return the tracer provider.

    Spans are created even with ``exporter="none"`` so that trace ids exist for log correlation and are
    propagated to downstream services.
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        # A process hosts one service; tests host several and share the first provider.
        return current
    provider = TracerProvider(resource=Resource.create({"service.name": f"maas-{service}"}))
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

"""OpenTelemetry tracing: one tracer provider per process, exporter chosen by settings.

gRPC calls carry the trace context in their metadata (``shared.grpc``); the helpers below carry it across
the boundaries that have no metadata: a job queued now and run later, a Ray actor the scheduler starts.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace import Span

_tracer = trace.get_tracer("maas")


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


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span, "" when there is none."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def continue_trace(name: str, traceparent: str, attributes: Mapping[str, str | int] | None = None) -> Span:
    """Start (not make current) a span that is a child of ``traceparent``'s span: a new trace when it is
    empty or malformed, as for a job stored before its trace context was."""
    parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
    return _tracer.start_span(name, context=parent, attributes=attributes)


def flush_tracing(timeout_s: float = 5.0) -> bool:
    """Export the spans the batch processor still holds (blocking; False if that took too long).

    A process the scheduler ends with ``ray.kill`` runs no exit hook, so the last spans of its work would be
    lost: the actors' host flushes before it is killed.
    """
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        return provider.force_flush(int(timeout_s * 1000))
    return True

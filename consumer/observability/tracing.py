"""Traces through Kafka: W3C context in record headers, the consumer's span, the tracer provider.

Traces continue the producer's trace: `extract_context(headers)` reads `traceparent` /
`tracestate` from the request's Kafka headers, the consumer's spans are its children, and
`inject_context(reply_headers)` carries the trace on into the reply.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from consumer.settings.observability import TelemetrySettings

KafkaHeaders = Sequence[tuple[str, bytes]]

_PROPAGATOR = TraceContextTextMapPropagator()


class _HeaderGetter(Getter[KafkaHeaders]):
    def get(self, carrier: KafkaHeaders, key: str) -> list[str] | None:
        values = [
            value.decode("latin-1")
            for name, value in carrier
            if name.lower() == key and value is not None
        ]
        return values or None

    def keys(self, carrier: KafkaHeaders) -> list[str]:
        return [name.lower() for name, _ in carrier]


class _HeaderSetter(Setter[list[tuple[str, bytes]]]):
    def set(self, carrier: list[tuple[str, bytes]], key: str, value: str) -> None:
        # Replace, never duplicate: a forwarded message must carry one traceparent.
        carrier[:] = [(name, v) for name, v in carrier if name.lower() != key]
        carrier.append((key, value.encode("latin-1")))


_GETTER = _HeaderGetter()
_SETTER = _HeaderSetter()


def extract_context(headers: KafkaHeaders) -> Context:
    """The trace context a producer put in Kafka headers (an empty context when none)."""
    return _PROPAGATOR.extract(headers, getter=_GETTER)


def inject_context(
    headers: list[tuple[str, bytes]], context: Context | None = None
) -> list[tuple[str, bytes]]:
    """Write `traceparent`/`tracestate` for `context` (default: the current one) into `headers`.

    Mutates and returns `headers`; existing trace headers are replaced.
    """
    _PROPAGATOR.inject(headers, context=context, setter=_SETTER)
    return headers


def trace_headers(context: Context | None = None) -> dict[str, str]:
    """`traceparent`/`tracestate` for `context` as a dict, for FastStream's `publish(headers=)`."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier


def tracer_provider(
    settings: TelemetrySettings, resource: Resource, span_exporter: SpanExporter | None = None
) -> TracerProvider:
    """The provider whose spans go to the OTLP endpoint (when set) and to `span_exporter`."""
    provider = TracerProvider(
        resource=resource,
        sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)),
    )
    if span_exporter is not None:
        # Injected exporters are for tests and debugging: export each span as it ends.
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    if settings.otlp_endpoint:
        provider.add_span_processor(BatchSpanProcessor(_otlp_span_exporter(settings)))
    return provider


@contextmanager
def consume_span(
    tracer: Tracer,
    headers: KafkaHeaders,
    *,
    topic: str,
    partition: int,
    offset: int,
    operation: str | None = None,
) -> Iterator[Span]:
    """A CONSUMER span for one request, child of the producer's span from `headers`."""
    attributes: dict[str, str | int] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": topic,
        "messaging.destination.partition.id": str(partition),
        "messaging.kafka.offset": offset,
    }
    if operation is not None:
        attributes["opstream.operation"] = operation
    with tracer.start_as_current_span(
        f"process {topic}",
        context=extract_context(headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        yield span


def _otlp_span_exporter(settings: TelemetrySettings) -> SpanExporter:
    # Imported here: the exporter pulls in requests and protobuf, needless without an endpoint.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    assert settings.otlp_endpoint is not None
    endpoint = settings.otlp_endpoint.rstrip("/")
    if not endpoint.endswith("/v1/traces"):
        endpoint += "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint, timeout=settings.otlp_timeout_s)

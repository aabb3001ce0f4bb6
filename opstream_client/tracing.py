"""W3C trace context on requests, when the OpenTelemetry API is installed (it is optional)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.propagators.textmap import Setter
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the client works without tracing
    trace = None  # type: ignore[assignment]


if trace is not None:

    class _HeaderSetter(Setter[list[tuple[str, bytes]]]):
        def set(self, carrier: list[tuple[str, bytes]], key: str, value: str) -> None:
            carrier[:] = [(name, v) for name, v in carrier if name.lower() != key]
            carrier.append((key, value.encode("latin-1")))

    _PROPAGATOR = TraceContextTextMapPropagator()
    _SETTER = _HeaderSetter()


def default_tracer() -> Any:
    """The client's tracer, or None without the OpenTelemetry API."""
    return trace.get_tracer("opstream.client") if trace is not None else None


@contextlib.contextmanager
def producer_span(
    tracer: Any, topic: str, operation: str, headers: list[tuple[str, bytes]]
) -> Iterator[Any]:
    """A PRODUCER span around sending one request, its context injected into `headers`
    (`traceparent`/`tracestate`); yields the span, or None without tracing."""
    if tracer is None or trace is None:
        yield None
        return
    with tracer.start_as_current_span(
        f"send {topic}",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.destination.name": topic,
            "opstream.operation": operation,
        },
    ) as span:
        _PROPAGATOR.inject(headers, setter=_SETTER)
        yield span

"""OpenTelemetry for opstream: the tracer and meter providers, built once, and GET /metrics.

Tracing through Kafka headers is `observability.tracing`; the instruments are
`observability.metrics`. Metrics are exported for Prometheus to scrape at GET /metrics
(`metrics_asgi`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from faststream.asgi import AsgiResponse, get
from faststream.asgi.handlers import GetHandler
from faststream.asgi.types import Scope
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from consumer.observability.engine_gauges import EngineInfoSource, GpuMemory, gpu_memory
from consumer.observability.metrics import LagSource, Metrics
from consumer.observability.tracing import (
    consume_span,
    extract_context,
    inject_context,
    trace_headers,
    tracer_provider,
)
from consumer.settings.observability import TelemetrySettings


class Telemetry:
    """The process's tracer and meter providers, built once from `TelemetrySettings`.

    Nothing global is touched, so tests can build several.
    """

    def __init__(
        self,
        settings: TelemetrySettings,
        *,
        instance_id: str | None = None,
        service_version: str | None = None,
        span_exporter: SpanExporter | None = None,
        metric_readers: Sequence[MetricReader] = (),
    ) -> None:
        self.settings = settings
        attributes: dict[str, str] = {"service.name": settings.service_name}
        if instance_id:
            attributes["service.instance.id"] = instance_id
        if service_version:
            attributes["service.version"] = service_version
        resource = Resource.create(attributes)

        self.tracer_provider = tracer_provider(settings, resource, span_exporter)
        self.tracer = self.tracer_provider.get_tracer("opstream")
        # A CONSUMER span for one request, child of the producer's span from its headers.
        self.consume_span = partial(consume_span, self.tracer)

        self.registry = CollectorRegistry(auto_describe=True)
        readers = list(metric_readers)
        if settings.prometheus_enabled:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            # Scope labels (otel_scope_*) would repeat "opstream" on every series.
            readers.append(PrometheusMetricReader(registry=self.registry, scope_info_enabled=False))
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        self.metrics = Metrics(self.meter_provider.get_meter("opstream"))

    def prometheus_text(self) -> bytes:
        """The current metrics in Prometheus text exposition format (one engine reading)."""
        with self.metrics.engine.collection():
            return generate_latest(self.registry)

    def metrics_asgi(self) -> GetHandler:
        """The GET /metrics handler: `asgi_routes=[("/metrics", telemetry.metrics_asgi())]`."""

        @get(include_in_schema=False, description="Prometheus metrics")
        async def prometheus_metrics(scope: Scope) -> AsgiResponse:
            if not self.settings.prometheus_enabled:
                return AsgiResponse(b"metrics disabled\n", status_code=404)
            return AsgiResponse(
                self.prometheus_text(), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        return prometheus_metrics

    def shutdown(self) -> None:
        """Flush pending spans and metrics and stop the exporters."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


__all__ = [
    "EngineInfoSource",
    "GpuMemory",
    "LagSource",
    "Metrics",
    "Telemetry",
    "TelemetrySettings",
    "extract_context",
    "gpu_memory",
    "inject_context",
    "trace_headers",
]

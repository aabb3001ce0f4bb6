"""OpenTelemetry for opstream: tracer and meter providers, W3C context in Kafka headers, metrics.

Traces continue the producer's trace: `extract_context(headers)` reads `traceparent` /
`tracestate` from the request's Kafka headers, the consumer's spans are its children, and
`inject_context(reply_headers)` carries the trace on into the reply. Metrics are exported for
Prometheus to scrape at GET /metrics (`metrics_asgi`); instrument names below are the
OpenTelemetry names, Prometheus sees them with dots as underscores plus unit and `_total`
suffixes (e.g. `opstream_requests_total`, `opstream_request_duration_milliseconds_bucket`).
ops/observability/grafana/dashboards/opstream.json charts these names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from faststream.asgi import AsgiResponse, get
from faststream.asgi.handlers import GetHandler
from faststream.asgi.types import Scope
from opentelemetry import metrics
from opentelemetry.context import Context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from consumer.engine.base import EngineInfo
from consumer.settings.observability import TelemetrySettings

KafkaHeaders = Sequence[tuple[str, bytes]]
# (topic, partition) → messages behind the log end offset.
LagSource = Callable[[], Mapping[tuple[str, int], int]]
# The engine's info (None before an engine exists); GPU memory is read from its details.
EngineInfoSource = Callable[[], EngineInfo | None]

# Milliseconds: a cached classify answers in tens of ms, a long summary on a T4 takes a minute.
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
                      120_000, 300_000)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

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


class Metrics:
    """The service's instruments, with one method per thing worth counting.

    Attributes are low-cardinality on purpose: operation, status, error code, limit kind,
    topic/partition. Never a tenant id or request id.
    """

    def __init__(self, meter: metrics.Meter) -> None:
        self.requests = meter.create_counter(
            "opstream.requests", unit="{request}", description="Requests answered."
        )
        self.tokens = meter.create_counter(
            "opstream.tokens", unit="{token}", description="Model tokens, by direction."
        )
        self.queue_duration = meter.create_histogram(
            "opstream.queue.duration",
            unit="ms",
            description="From the fetch to the engine running the request (admission and "
            "the wait for a slot; reply meta's queue_ms).",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.first_token_duration = meter.create_histogram(
            "opstream.first_token.duration",
            unit="ms",
            description="From a slot taking the request to its first token (prefill).",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.request_duration = meter.create_histogram(
            "opstream.request.duration",
            unit="ms",
            description="From the fetch to the reply (reply meta's and the usage row's "
            "total_ms; the time on the bus before is the stage `bus`).",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.stage_duration = meter.create_histogram(
            "opstream.stage.duration",
            unit="ms",
            description="Each stage of a request's life (bus, admission, slot_wait, prefill, "
            "generation, total), as reply meta and usage rows name them.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.in_flight = meter.create_up_down_counter(
            "opstream.requests.in_flight",
            unit="{request}",
            description="Requests taken from Kafka and not yet answered.",
        )
        self.batch_size = meter.create_histogram(
            "opstream.engine.batch_size",
            unit="{request}",
            description="Requests the engine ran together in one batch.",
            explicit_bucket_boundaries_advisory=BATCH_SIZE_BUCKETS,
        )
        self.abandoned = meter.create_counter(
            "opstream.intake.abandoned",
            unit="{record}",
            description="Records a revocation or shutdown gave up on when the grace ran out: "
            "left uncommitted, run again by the next owner.",
        )
        self.quota_rejections = meter.create_counter(
            "opstream.quota.rejections",
            unit="{request}",
            description="Requests refused because a daily limit was used up.",
        )
        self.unreadable_batches = meter.create_counter(
            "opstream.unreadable_batches",
            unit="{batch}",
            description="Fetched record batches that could not be read (codec missing, "
            "corrupt); each one pauses its partition on this instance.",
        )
        self._lag_source: LagSource | None = None
        self.consumer_lag = meter.create_observable_gauge(
            "opstream.consumer.lag",
            callbacks=[self._observe_lag],
            unit="{message}",
            description="Messages between the committed offset and the log end, per partition.",
        )
        self._engine_info: EngineInfoSource | None = None
        # Only engines that report `details["gpus"]` (exllamav2) have these series.
        self.gpu_memory_used = meter.create_observable_gauge(
            "opstream.gpu.memory.used",
            callbacks=[self._observe_gpu_memory_used],
            unit="By",
            description="GPU memory in use on each device the engine runs on.",
        )
        self.gpu_memory_limit = meter.create_observable_gauge(
            "opstream.gpu.memory.limit",
            callbacks=[self._observe_gpu_memory_limit],
            unit="By",
            description="GPU memory each device the engine runs on has in all.",
        )

        # The scheduler's capacity signals (what an autoscaler reads: queued tokens).
        for name, unit, description, read in _SCHEDULER_GAUGES:
            meter.create_observable_gauge(
                f"opstream.scheduler.{name}",
                callbacks=[self._scheduler_callback(read)],
                unit=unit,
                description=description,
            )
        for name, unit, description in _SCHEDULER_COUNTERS:
            meter.create_observable_counter(
                f"opstream.scheduler.{name}",
                callbacks=[self._scheduler_count(name)],
                unit=unit,
                description=description,
            )

    def _scheduler_count(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            state = self._scheduler()
            return [] if state is None else [Observation(state.counts.get(name, 0))]

        return observe

    def count_request(self, operation: str, status: str, code: str | None = None) -> None:
        """One answered request; `status` is ok|error, `code` the error code when there is one."""
        # Always present (empty for ok): Prometheus wants one label set per series family.
        self.requests.add(1, {"operation": operation, "status": status, "code": code or ""})

    def count_tokens(self, operation: str, input_tokens: int, output_tokens: int) -> None:
        """Tokens the model read and wrote for one request."""
        self.tokens.add(input_tokens, {"operation": operation, "direction": "input"})
        self.tokens.add(output_tokens, {"operation": operation, "direction": "output"})

    def observe_latency(
        self,
        operation: str,
        *,
        queue_ms: float | None = None,
        first_token_ms: float | None = None,
        total_ms: float | None = None,
    ) -> None:
        """Record whichever of a request's latencies are known (milliseconds)."""
        attributes = {"operation": operation}
        if queue_ms is not None:
            self.queue_duration.record(max(queue_ms, 0.0), attributes)
        if first_token_ms is not None:
            self.first_token_duration.record(max(first_token_ms, 0.0), attributes)
        if total_ms is not None:
            self.request_duration.record(max(total_ms, 0.0), attributes)

    def observe_stages(self, operation: str, stages: Mapping[str, float | None]) -> None:
        """Record a request's stages (`bus_ms` … `total_ms`, as `Stages.as_fields` names
        them; None: not reached) and the queue / first-token / request latencies they make."""
        for name, value in stages.items():
            if value is not None and name.endswith("_ms"):
                attributes = {"operation": operation, "stage": name.removesuffix("_ms")}
                self.stage_duration.record(max(value, 0.0), attributes)
        admission, slot_wait = stages.get("admission_ms"), stages.get("slot_wait_ms")
        self.observe_latency(
            operation,
            queue_ms=None if admission is None else admission + (slot_wait or 0.0),
            first_token_ms=stages.get("prefill_ms"),
            total_ms=stages.get("total_ms"),
        )

    @contextmanager
    def track_in_flight(self, operation: str) -> Iterator[None]:
        """Count a request as in flight for the duration of the `with` block."""
        attributes = {"operation": operation}
        self.in_flight.add(1, attributes)
        try:
            yield
        finally:
            self.in_flight.add(-1, attributes)

    def observe_batch_size(self, size: int, backend: str) -> None:
        """One engine batch of `size` requests."""
        self.batch_size.record(size, {"backend": backend})

    def batch_observer(self, backend: str) -> Callable[[int], None]:
        """An `Engine.on_batch` hook that records each batch of `backend` (thread-safe)."""
        return lambda size: self.observe_batch_size(size, backend)

    def count_abandoned(self, count: int, reason: str) -> None:
        """Records a drain abandoned unfinished; `reason` is revoke|shutdown."""
        self.abandoned.add(count, {"reason": reason})

    def count_quota_rejection(self, operation: str, limit: str) -> None:
        """A request refused by a quota; `limit` names it (requests, tokens, …)."""
        self.quota_rejections.add(1, {"operation": operation, "limit": limit})

    def count_unreadable_batch(self, topic: str | None, partition: int | None, error: str) -> None:
        """A fetched batch that could not be read; `error` is aiokafka's exception class name."""
        self.unreadable_batches.add(
            1,
            {
                "topic": topic or "unknown",
                "partition": "unknown" if partition is None else str(partition),
                "error": error,
            },
        )

    def set_lag_source(self, source: LagSource | None) -> None:
        """Register the callable that reports lag per (topic, partition) at each scrape."""
        self._lag_source = source

    def _observe_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        source = self._lag_source
        if source is None:
            return []
        return [
            Observation(lag, {"topic": topic, "partition": partition})
            for (topic, partition), lag in source().items()
        ]

    def set_engine_info_source(self, source: EngineInfoSource | None) -> None:
        """Register the callable whose engine info reports GPU memory at each scrape."""
        self._engine_info = source

    def _observe_gpu_memory_used(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(gpu.used_bytes, gpu.labels) for gpu in self._gpus()]

    def _observe_gpu_memory_limit(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(gpu.total_bytes, gpu.labels) for gpu in self._gpus()]

    def _scheduler(self) -> SchedulerState | None:
        source = self._engine_info
        return scheduler_state(source() if source is not None else None)

    def _scheduler_callback(
        self, read: Callable[[SchedulerState], list[Observation]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            state = self._scheduler()
            return [] if state is None else read(state)

        return observe

    def _gpus(self) -> list[GpuMemory]:
        source = self._engine_info
        return gpu_memory(source() if source is not None else None)


@dataclass(frozen=True, slots=True)
class SchedulerState:
    """The scheduler's load as the engine reports it in `details["scheduler"]`."""

    slots: int
    running: int
    queued_requests: dict[str, int]
    queued_tokens: dict[str, int]
    counts: dict[str, int]  # the scheduler's monotonic counters (`_SCHEDULER_COUNTERS`)


def scheduler_state(info: EngineInfo | None) -> SchedulerState | None:
    """The engine's scheduler load, or None before an engine exists (or one without it)."""
    state = info.details.get("scheduler") if info is not None else None
    if not isinstance(state, dict):
        return None
    return SchedulerState(
        slots=int(state.get("slots", 0)),
        running=int(state.get("running", 0)),
        queued_requests=dict(state.get("queued_requests", {})),
        queued_tokens=dict(state.get("queued_tokens", {})),
        counts={name: int(state.get(name) or 0) for name, _, _ in _SCHEDULER_COUNTERS},
    )


def _per_priority(counts: dict[str, int]) -> list[Observation]:
    return [Observation(n, {"priority": p}) for p, n in counts.items()]


# (name, unit, description, what to observe) of each scheduler gauge.
_SCHEDULER_GAUGES: tuple[
    tuple[str, str, str, Callable[[SchedulerState], list[Observation]]], ...
] = (
    (
        "queued_requests",
        "{request}",
        "Requests admitted to the engine's scheduler and waiting for a slot.",
        lambda s: _per_priority(s.queued_requests),
    ),
    (
        "queued_tokens",
        "{token}",
        "Prompt + remaining output tokens of the queued requests.",
        lambda s: _per_priority(s.queued_tokens),
    ),
    (
        "running",
        "{sequence}",
        "Sequences in the running batch.",
        lambda s: [Observation(s.running)],
    ),
    (
        "slots",
        "{sequence}",
        "Sequences the engine can run at once.",
        lambda s: [Observation(s.slots)],
    ),
    (
        "slot_occupancy",
        "1",
        "Running sequences over slots (0 to 1).",
        lambda s: [Observation(s.running / s.slots)] if s.slots else [],
    ),
)


# (name, unit, description) of each counter the scheduler keeps (engine details["scheduler"]).
_SCHEDULER_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("preemptions", "{request}", "Running work paused for other work (it resumes later)."),
    ("reprefill_tokens", "{token}", "Tokens prefilled again when paused work resumed."),
    ("refused_starts", "{request}", "Starts the backend refused (requeued, never answered)."),
    (
        "disagreements",
        "{request}",
        "Running work the backend no longer advanced (answered retryable).",
    ),
    ("stalls", "{stall}", "Times open work made no progress for engine.scheduler.stall_after_s."),
)


@dataclass(frozen=True, slots=True)
class GpuMemory:
    """One device's memory as the engine reports it."""

    index: int
    name: str
    used_bytes: int
    total_bytes: int

    @property
    def labels(self) -> dict[str, str]:
        return {"gpu": str(self.index), "name": self.name}


def gpu_memory(info: EngineInfo | None) -> list[GpuMemory]:
    """The devices in the engine's `details["gpus"]` (exllamav2 reports them), else none.

    No engine, a CPU engine or an engine that lost its GPU reports no device; an entry
    without integer byte counts is skipped rather than failing the scrape.
    """
    gpus = info.details.get("gpus") if info is not None else None
    if not isinstance(gpus, list):
        return []
    return [
        GpuMemory(
            index=gpu["index"] if isinstance(gpu.get("index"), int) else position,
            name=str(gpu.get("name", "")),
            used_bytes=gpu["memory_used_bytes"],
            total_bytes=gpu["memory_total_bytes"],
        )
        for position, gpu in enumerate(gpus)
        if isinstance(gpu, dict)
        and isinstance(gpu.get("memory_used_bytes"), int)
        and isinstance(gpu.get("memory_total_bytes"), int)
    ]


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

        self.tracer_provider = TracerProvider(
            resource=resource,
            sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)),
        )
        if span_exporter is not None:
            # Injected exporters are for tests and debugging: export each span as it ends.
            self.tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        if settings.otlp_endpoint:
            self.tracer_provider.add_span_processor(
                BatchSpanProcessor(_otlp_span_exporter(settings))
            )
        self.tracer = self.tracer_provider.get_tracer("opstream")

        self.registry = CollectorRegistry(auto_describe=True)
        readers = list(metric_readers)
        if settings.prometheus_enabled:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            # Scope labels (otel_scope_*) would repeat "opstream" on every series.
            readers.append(PrometheusMetricReader(registry=self.registry, scope_info_enabled=False))
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        self.metrics = Metrics(self.meter_provider.get_meter("opstream"))

    @contextmanager
    def consume_span(
        self,
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
        with self.tracer.start_as_current_span(
            f"process {topic}",
            context=extract_context(headers),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        ) as span:
            yield span

    def prometheus_text(self) -> bytes:
        """The current metrics in Prometheus text exposition format."""
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


def _otlp_span_exporter(settings: TelemetrySettings) -> SpanExporter:
    # Imported here: the exporter pulls in requests and protobuf, needless without an endpoint.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    assert settings.otlp_endpoint is not None
    endpoint = settings.otlp_endpoint.rstrip("/")
    if not endpoint.endswith("/v1/traces"):
        endpoint += "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint, timeout=settings.otlp_timeout_s)


def trace_headers(context: Context | None = None) -> dict[str, str]:
    """`traceparent`/`tracestate` for `context` as a dict, for FastStream's `publish(headers=)`."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier


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

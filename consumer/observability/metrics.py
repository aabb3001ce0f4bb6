"""The service's metrics: one instrument per thing worth counting, and the engine's gauges.

Instrument names are the OpenTelemetry names; Prometheus sees them with dots as underscores
plus unit and `_total` suffixes (e.g. `opstream_requests_total`,
`opstream_request_duration_milliseconds_bucket`). ops/observability/grafana/dashboards/
opstream.json charts these names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from consumer.observability.engine_gauges import (
    SCHEDULER_COUNTERS,
    SCHEDULER_GAUGES,
    EngineInfoSource,
    EngineReading,
    GpuMemory,
    SchedulerState,
    gpu_memory,
    grammar_cache_counts,
    scheduler_state,
)

# (topic, partition) → messages behind the log end offset.
LagSource = Callable[[], Mapping[tuple[str, int], int]]

# Milliseconds: a cached classify answers in tens of ms, a long summary on a T4 takes a minute.
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
                      120_000, 300_000)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


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
        self.engine = EngineReading()
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

        # Constrained decoding (extract, response_format): compiled grammars by schema hash.
        meter.create_observable_counter(
            "opstream.grammar.cache.lookups",
            callbacks=[self._observe_grammar_cache],
            unit="{lookup}",
            description="Compiled-grammar cache lookups by result: hit, miss (compiled now), "
            "refused (the schema could not be compiled).",
        )

        # The scheduler's capacity signals (what an autoscaler reads: queued tokens).
        for name, unit, description, read in SCHEDULER_GAUGES:
            meter.create_observable_gauge(
                f"opstream.scheduler.{name}",
                callbacks=[self._scheduler_callback(read)],
                unit=unit,
                description=description,
            )
        for name, unit, description in SCHEDULER_COUNTERS:
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
        """Register the callable whose engine info the scheduler and GPU gauges report."""
        self.engine.source = source

    def _observe_gpu_memory_used(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(gpu.used_bytes, gpu.labels) for gpu in self._gpus()]

    def _observe_gpu_memory_limit(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(gpu.total_bytes, gpu.labels) for gpu in self._gpus()]

    def _scheduler(self) -> SchedulerState | None:
        return scheduler_state(self.engine.info())

    def _scheduler_callback(
        self, read: Callable[[SchedulerState], list[Observation]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            state = self._scheduler()
            return [] if state is None else read(state)

        return observe

    def _observe_grammar_cache(self, options: CallbackOptions) -> Iterable[Observation]:
        counts = grammar_cache_counts(self.engine.info())
        return [Observation(n, {"result": result}) for result, n in counts.items()]

    def _gpus(self) -> list[GpuMemory]:
        return gpu_memory(self.engine.info())

"""Traces continue through Kafka headers; metrics reach GET /metrics under documented names."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from consumer.engine.base import EngineInfo
from consumer.observability.telemetry import (
    Telemetry,
    TelemetrySettings,
    extract_context,
    gpu_memory,
    inject_context,
    trace_headers,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def telemetry(spans: InMemorySpanExporter) -> Iterator[Telemetry]:
    telemetry = Telemetry(TelemetrySettings(), instance_id="test-1", span_exporter=spans)
    yield telemetry
    telemetry.shutdown()


async def call_asgi(app: Any, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent[0], sent[1]
    return start["status"], dict(start["headers"]), body["body"]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def only_span(spans: InMemorySpanExporter, name: str) -> ReadableSpan:
    matching = [s for s in spans.get_finished_spans() if s.name == name]
    assert len(matching) == 1, [s.name for s in spans.get_finished_spans()]
    return matching[0]


def test_consumer_span_is_a_child_of_the_producer_span_from_the_headers(
    telemetry: Telemetry, spans: InMemorySpanExporter
) -> None:
    producer = Telemetry(TelemetrySettings(service_name="producer"), span_exporter=spans)
    headers: list[tuple[str, bytes]] = [("correlation_id", b"c-1")]
    with producer.tracer.start_as_current_span("send ops.requests.v1") as parent:
        inject_context(headers)
    parent_context = parent.get_span_context()

    with telemetry.consume_span(
        headers, topic="ops.requests.v1", partition=3, offset=42, operation="summarize"
    ):
        pass

    child = only_span(spans, "process ops.requests.v1")
    assert child.kind is SpanKind.CONSUMER
    assert child.context is not None and child.parent is not None
    assert child.context.trace_id == parent_context.trace_id
    assert child.parent.span_id == parent_context.span_id
    assert child.attributes is not None
    assert child.attributes["messaging.kafka.offset"] == 42
    assert child.attributes["opstream.operation"] == "summarize"


def test_request_without_trace_headers_starts_a_new_trace(
    telemetry: Telemetry, spans: InMemorySpanExporter
) -> None:
    with telemetry.consume_span([], topic="t", partition=0, offset=0):
        pass
    assert only_span(spans, "process t").parent is None


def test_inject_then_extract_round_trips_traceparent_and_tracestate() -> None:
    incoming = [("traceparent", TRACEPARENT.encode()), ("tracestate", b"vendor=opaque")]
    context = extract_context(incoming)
    span_context = trace.get_current_span(context).get_span_context()
    assert format(span_context.trace_id, "032x") == TRACE_ID
    assert format(span_context.span_id, "016x") == PARENT_ID
    assert span_context.is_remote and span_context.trace_flags.sampled

    outgoing = inject_context([("reply_to", b"ops.replies.v1")], context)
    assert dict(outgoing) == {
        "reply_to": b"ops.replies.v1",
        "traceparent": TRACEPARENT.encode(),
        "tracestate": b"vendor=opaque",
    }
    assert trace_headers(context) == {"traceparent": TRACEPARENT, "tracestate": "vendor=opaque"}


def test_inject_replaces_an_existing_traceparent_instead_of_adding_a_second(
    telemetry: Telemetry,
) -> None:
    headers = [("traceparent", TRACEPARENT.encode())]
    with telemetry.tracer.start_as_current_span("reply"):
        inject_context(headers)
    assert [name for name, _ in headers] == ["traceparent"]
    assert headers[0][1] != TRACEPARENT.encode()


def test_malformed_traceparent_is_ignored() -> None:
    context = extract_context([("traceparent", b"garbage")])
    assert not trace.get_current_span(context).get_span_context().is_valid


async def test_metrics_endpoint_exposes_every_instrument_after_recording(
    telemetry: Telemetry,
) -> None:
    metrics = telemetry.metrics
    metrics.count_request("summarize", "ok")
    metrics.count_request("chat", "error", code="quota_exceeded")
    metrics.count_tokens("summarize", input_tokens=120, output_tokens=30)
    metrics.observe_latency("summarize", queue_ms=4, first_token_ms=80, total_ms=900)
    metrics.observe_batch_size(8, backend="exllamav2")
    metrics.count_quota_rejection("chat", limit="tokens")
    metrics.set_lag_source(lambda: {("ops.requests.v1", 0): 7, ("ops.requests.v1", 1): 0})
    with metrics.track_in_flight("classify"):
        status, headers, body = await call_asgi(telemetry.metrics_asgi(), "/metrics")

    assert status == 200
    assert headers[b"content-type"].startswith(b"text/plain")
    found = samples(body.decode())

    def value(name: str, **labels: str) -> float:
        return found[(name, frozenset(labels.items()))]

    assert value("opstream_requests_total", operation="summarize", status="ok", code="") == 1
    assert (
        value("opstream_requests_total", operation="chat", status="error", code="quota_exceeded")
        == 1
    )
    assert value("opstream_tokens_total", operation="summarize", direction="input") == 120
    assert value("opstream_tokens_total", operation="summarize", direction="output") == 30
    for histogram in ("queue_duration", "first_token_duration", "request_duration"):
        name = f"opstream_{histogram}_milliseconds_count"
        assert value(name, operation="summarize") == 1
    assert value("opstream_request_duration_milliseconds_sum", operation="summarize") == 900
    assert value("opstream_request_duration_milliseconds_bucket", operation="summarize", le="1000")
    assert not value(
        "opstream_request_duration_milliseconds_bucket", operation="summarize", le="500"
    )
    assert value("opstream_engine_batch_size_sum", backend="exllamav2") == 8
    assert value("opstream_requests_in_flight", operation="classify") == 1
    assert value("opstream_quota_rejections_total", operation="chat", limit="tokens") == 1
    assert value("opstream_consumer_lag", topic="ops.requests.v1", partition="0") == 7
    assert value("opstream_consumer_lag", topic="ops.requests.v1", partition="1") == 0


def test_in_flight_returns_to_zero_when_the_request_fails(telemetry: Telemetry) -> None:
    with pytest.raises(RuntimeError), telemetry.metrics.track_in_flight("chat"):
        raise RuntimeError("engine failed")
    found = samples(telemetry.prometheus_text().decode())
    key = ("opstream_requests_in_flight", frozenset({("operation", "chat")}))
    assert found[key] == 0


def test_batch_observer_records_each_batch_under_its_backend(telemetry: Telemetry) -> None:
    on_batch = telemetry.metrics.batch_observer("llamacpp")
    on_batch(1)
    on_batch(3)
    found = samples(telemetry.prometheus_text().decode())
    labels = frozenset({("backend", "llamacpp")})
    assert found[("opstream_engine_batch_size_count", labels)] == 2
    assert found[("opstream_engine_batch_size_sum", labels)] == 4
    assert found[("opstream_engine_batch_size_bucket", labels | {("le", "1")})] == 1


async def test_metrics_endpoint_is_404_when_prometheus_is_disabled() -> None:
    telemetry = Telemetry(TelemetrySettings(prometheus_enabled=False))
    status, _, _ = await call_asgi(telemetry.metrics_asgi(), "/metrics")
    assert status == 404


def test_otlp_endpoint_gets_a_batch_exporter_to_v1_traces() -> None:
    telemetry = Telemetry(TelemetrySettings(otlp_endpoint="http://collector:4318/"))
    processors = telemetry.tracer_provider._active_span_processor._span_processors
    exporters = [p.span_exporter for p in processors]  # type: ignore[attr-defined]
    assert [e._endpoint for e in exporters] == ["http://collector:4318/v1/traces"]
    telemetry.tracer_provider._active_span_processor._span_processors = ()  # nothing to flush
    telemetry.shutdown()


def test_gpu_memory_is_exported_per_device_the_engine_reports(telemetry: Telemetry) -> None:
    gpus = [
        {"index": 0, "name": "Tesla T4", "memory_used_bytes": 9_000, "memory_total_bytes": 16_000},
        {"index": 1, "name": "Tesla T4", "memory_used_bytes": 1_000, "memory_total_bytes": 16_000},
        {"index": 2, "name": "lost", "error": "no memory figures"},
    ]
    info = EngineInfo("exllamav2", "qwen", True, {"gpus": gpus})
    telemetry.metrics.set_engine_info_source(lambda: info)
    found = samples(telemetry.prometheus_text().decode())

    def labels(index: str) -> frozenset[tuple[str, str]]:
        return frozenset({("gpu", index), ("name", "Tesla T4")})

    assert found[("opstream_gpu_memory_used_bytes", labels("0"))] == 9_000
    assert found[("opstream_gpu_memory_used_bytes", labels("1"))] == 1_000
    assert found[("opstream_gpu_memory_limit_bytes", labels("0"))] == 16_000
    gpu_series = [key for key in found if key[0].startswith("opstream_gpu")]
    assert len(gpu_series) == 4, "the device without memory figures has no series"


def test_an_engine_without_gpus_exports_no_gpu_memory_series(telemetry: Telemetry) -> None:
    telemetry.metrics.set_engine_info_source(
        lambda: EngineInfo("llamacpp", "qwen", True, {"n_ctx": 4096})
    )
    assert gpu_memory(None) == []
    assert gpu_memory(EngineInfo("exllamav2", "qwen", False, {"error": "GPU lost"})) == []
    found = samples(telemetry.prometheus_text().decode())
    assert not [name for name, _ in found if name.startswith("opstream_gpu")]


def test_the_schedulers_capacity_signals_are_exported(telemetry: Telemetry) -> None:
    scheduler = {
        "slots": 8,
        "running": 6,
        "queued_requests": {"interactive": 3, "batch": 40},
        "queued_tokens": {"interactive": 900, "batch": 12_000},
    }
    info = EngineInfo("llamacpp", "smol", True, {"scheduler": scheduler})
    telemetry.metrics.set_engine_info_source(lambda: info)
    found = samples(telemetry.prometheus_text().decode())
    batch = frozenset({("priority", "batch")})
    interactive = frozenset({("priority", "interactive")})
    assert found[("opstream_scheduler_queued_tokens", batch)] == 12_000
    assert found[("opstream_scheduler_queued_tokens", interactive)] == 900
    assert found[("opstream_scheduler_queued_requests", batch)] == 40
    assert found[("opstream_scheduler_running", frozenset())] == 6
    assert found[("opstream_scheduler_slots", frozenset())] == 8
    assert found[("opstream_scheduler_slot_occupancy", frozenset())] == 0.75


def test_one_scrape_reads_the_engine_once(telemetry: Telemetry) -> None:
    """Each scheduler and GPU series comes from the same reading of `engine.info` (on
    exllamav2 every read queries GPU memory), and the next scrape reads it again."""
    reads: list[int] = []
    scheduler = {"slots": 4, "running": 1, "queued_requests": {"batch": 2}, "queued_tokens": {}}
    gpu = {"index": 0, "name": "T4", "memory_used_bytes": 9, "memory_total_bytes": 16}

    def info() -> EngineInfo:
        reads.append(1)
        return EngineInfo("exllamav2", "qwen", True, {"scheduler": scheduler, "gpus": [gpu]})

    telemetry.metrics.set_engine_info_source(info)
    found = samples(telemetry.prometheus_text().decode())
    assert found[("opstream_scheduler_slots", frozenset())] == 4
    assert found[("opstream_gpu_memory_used_bytes", frozenset({("gpu", "0"), ("name", "T4")}))] == 9
    assert len(reads) == 1
    telemetry.prometheus_text()
    assert len(reads) == 2

"""Signed requests, reply_to checks, one trace end to end, and the HTTP probes, on a real broker.

One consumer (the real app from `build_app`, with the zero-cost fake engine) runs in this
test's event loop under uvicorn, so the engine, the quota API and both span exporters (the
client's and the consumer's) are in reach. Authentication is on, as in production.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import uvicorn
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from consumer.app import Service, build_app
from consumer.bus.devbroker import free_port
from consumer.bus.topic_reader import topic_partitions
from consumer.observability.telemetry import Telemetry
from consumer.settings import Settings
from opstream_client import OperationsClient
from schemas.headers import CONTENT_TYPE, CORRELATION_ID, DLQ_REASON, JSON, REPLY_TO
from schemas.replies import OperationReply
from schemas.signing import sign
from tests.support.dashboard import dashboard_metric_names, exported_series, load_dashboard
from tests.support.fake_engine import FakeEngine
from tests.support.harness import (
    FETCH_MAX_WAIT_MS,
    Broker,
    TopicSet,
    base_settings,
    ensure_test_topics,
    merge,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

TENANT_A, KEY_A, SECRET_A = "tenant-a", "key-a-1", secrets.token_urlsafe(32)
TENANT_B, KEY_B, SECRET_B = "tenant-b", "key-b-1", secrets.token_urlsafe(32)
ADMIN_KEY = secrets.token_urlsafe(24)
MAX_SKEW_S = 60


@dataclass
class Running:
    """The consumer under test and what the tests look at."""

    settings: Settings
    topics: TopicSet
    bootstrap: str
    port: int
    engine: FakeEngine
    service: Service
    spans: InMemorySpanExporter
    first_ready: tuple[int, Any]  # /ready as soon as HTTP answered, before the group join

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", headers=headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    async def get_json(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        status, body = await asyncio.to_thread(self.get, path, headers)
        return status, json.loads(body)

    async def metrics(self) -> str:
        """GET /metrics (Prometheus text)."""
        status, body = await asyncio.to_thread(self.get, "/metrics")
        assert status == 200, body
        return body.decode()

    async def charged_requests(self, tenant_id: str) -> int:
        """Chat requests counted against `tenant_id`'s quota today (GET /limits/usage)."""
        status, body = await self.get_json(
            f"/limits/usage?tenant_id={tenant_id}", {"X-Admin-Key": ADMIN_KEY}
        )
        assert status == 200, body
        rows = [r for r in body["usage"] if (r["tenant_id"], r["operation"]) == (tenant_id, "chat")]
        return sum(row["request_count"] for row in rows)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def running(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Running]:
    topics = TopicSet.unique()
    await ensure_test_topics(broker, topics)
    port = free_port()
    tmp: Path = tmp_path_factory.mktemp("security")
    settings = Settings(
        **merge(
            base_settings(broker, topics, tmp, auth=True),
            {
                "instance_id": f"test-sec-{uuid.uuid4().hex[:6]}",
                "http": {"host": "127.0.0.1", "port": port},
                "auth": {
                    "required": True,
                    "max_skew_s": MAX_SKEW_S,
                    "keys": {
                        TENANT_A: [{"key_id": KEY_A, "secret": SECRET_A}],
                        TENANT_B: [{"key_id": KEY_B, "secret": SECRET_B}],
                    },
                },
                "quota": {"admin_key": ADMIN_KEY},
            },
        )
    )
    spans = InMemorySpanExporter()
    engine = FakeEngine()
    telemetry = Telemetry(settings.telemetry, instance_id=settings.instance_id, span_exporter=spans)
    app = build_app(settings, engine=engine, telemetry=telemetry)
    service: Service = app.context.get("service")
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, lifespan="on", log_config=None, access_log=False
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started or serving.done(), 30, what="HTTP server started")
        assert not serving.done(), "the app failed to start"
        running = Running(
            settings, topics, broker.bootstrap, port, engine, service, spans, (0, None)
        )
        running.first_ready = await running.get_json("/ready")
        await wait_until(lambda: service.assigned, 90, what="partitions assigned")
        yield running
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 60)


# ── helpers: raw records, so the tests control every header ──


def chat_body(tenant_id: str) -> bytes:
    body = {
        "operation": "chat",
        "tenant_id": tenant_id,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
    }
    return json.dumps(body, separators=(",", ":")).encode()


async def publish(
    running: Running,
    value: bytes,
    *,
    key: str,
    reply_to: str | None = None,
    extra_headers: Sequence[tuple[str, bytes]] = (),
) -> str:
    """Send one request record; returns its correlation id."""
    correlation_id = uuid.uuid4().hex
    headers = [
        (CORRELATION_ID, correlation_id.encode()),
        (REPLY_TO, (reply_to or running.topics.replies).encode()),
        (CONTENT_TYPE, JSON.encode()),
        *extra_headers,
    ]
    producer = AIOKafkaProducer(bootstrap_servers=running.bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            running.topics.requests, value, key=key.encode(), headers=headers
        )
    finally:
        await producer.stop()
    return correlation_id


async def find_record(
    bootstrap: str, topic: str, correlation_id: str, timeout_s: float = 30.0
) -> ConsumerRecord[bytes, bytes]:
    """The record of `topic` with this correlation_id header (read from the beginning)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=FETCH_MAX_WAIT_MS
    )
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic)
        assignment = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assignment)
        await consumer.seek_to_beginning(*assignment)
        found: list[ConsumerRecord[bytes, bytes]] = []

        async def arrived() -> bool:
            batches = await consumer.getmany(timeout_ms=500)
            found.extend(
                record
                for records in batches.values()
                for record in records
                if (CORRELATION_ID, correlation_id.encode()) in list(record.headers)
            )
            return bool(found)

        what = f"a record with correlation id {correlation_id} on {topic}"
        await wait_until(arrived, timeout_s, interval_s=0, what=what)
        return found[0]
    finally:
        await consumer.stop()


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
        return {
            tp.partition: offset for tp, offset in (await consumer.end_offsets(partitions)).items()
        }
    finally:
        await consumer.stop()


def header(record: ConsumerRecord[bytes, bytes], name: str) -> str | None:
    return next((v.decode() for k, v in record.headers if k == name), None)


# ── /ready before the group join ──


async def test_ready_is_503_before_partitions_are_assigned_and_200_after(running: Running) -> None:
    status, body = running.first_ready
    assert status == 503
    assert body["ready"] is False
    assert body["model_loaded"] is True
    assert body["assigned_partitions"] == []
    assert "no partitions assigned" in body["reasons"]

    status, body = await running.get_json("/ready")
    assert status == 200
    assert body["ready"] is True
    assert len(body["assigned_partitions"]) == running.topics.partitions


# ── authentication ──


def signed(
    body: bytes, tenant_id: str, key_id: str, secret: str, now: float | None = None
) -> list[tuple[str, bytes]]:
    return sign(body, tenant_id, key_id, secret, time.time() if now is None else now)


REFUSALS = {
    "missing_signature": lambda body: [],
    "unknown_key": lambda body: signed(body, TENANT_A, "key-nobody", secrets.token_urlsafe(32)),
    "bad_signature": lambda body: signed(body, TENANT_A, KEY_A, SECRET_B),
    "stale": lambda body: signed(body, TENANT_A, KEY_A, SECRET_A, time.time() - MAX_SKEW_S - 120),
    # Tenant A's request, signed by tenant B with B's own key.
    "wrong_tenant": lambda body: signed(body, TENANT_A, KEY_B, SECRET_B),
}


async def test_unsigned_unknown_wrong_stale_and_forged_requests_are_refused_and_not_charged(
    running: Running,
) -> None:
    calls_before = running.engine.calls
    charged_before = await running.charged_requests(TENANT_A)
    charged_b_before = await running.charged_requests(TENANT_B)
    sent = {}
    for reason, headers_for in REFUSALS.items():
        body = chat_body(TENANT_A)
        sent[reason] = await publish(running, body, key=TENANT_A, extra_headers=headers_for(body))

    for reason, correlation_id in sent.items():
        record = await find_record(running.bootstrap, running.topics.replies, correlation_id)
        reply = OperationReply.model_validate_json(record.value)
        assert reply.status == "error", reason
        assert reply.error is not None
        assert (reply.error.code, reply.error.reason, reply.error.http_status) == (
            "unauthorized",
            reason,
            403,
        )
        assert reply.error.message
        assert reply.result is None

    assert running.engine.calls == calls_before, "a refused request reached the engine"
    assert await running.charged_requests(TENANT_A) == charged_before
    assert await running.charged_requests(TENANT_B) == charged_b_before


async def test_a_correctly_signed_request_is_served_and_charged_once(running: Running) -> None:
    calls_before = running.engine.calls
    charged_before = await running.charged_requests(TENANT_A)
    async with OperationsClient(
        running.bootstrap,
        request_topic=running.topics.requests,
        reply_topic=running.topics.replies,
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        timeout_s=30,
        key_id=KEY_A,
        secret=SECRET_A,
    ) as client:
        reply = await client.chat(
            tenant_id=TENANT_A, messages=[{"role": "user", "content": "hello"}], max_tokens=8
        )
    assert reply.status == "ok", reply.error
    assert reply.result is not None
    assert running.engine.calls == calls_before + 1
    assert await running.charged_requests(TENANT_A) == charged_before + 1


# ── reply_to ──


@pytest.mark.parametrize("target", ["control", "requests"])
async def test_reply_to_the_control_or_request_topic_is_dead_lettered(
    running: Running, target: str
) -> None:
    forbidden = running.topics.control if target == "control" else running.topics.requests
    control_before = await end_offsets(running.bootstrap, running.topics.control)
    calls_before = running.engine.calls
    body = chat_body(TENANT_A)
    correlation_id = await publish(
        running,
        body,
        key=TENANT_A,
        reply_to=forbidden,
        extra_headers=signed(body, TENANT_A, KEY_A, SECRET_A),
    )

    dead = await find_record(running.bootstrap, running.topics.dlq, correlation_id)
    reason = header(dead, DLQ_REASON)
    assert reason == f"reply_to topic '{forbidden}' is not allowed"
    assert dead.value == body
    assert running.engine.calls == calls_before
    assert await end_offsets(running.bootstrap, running.topics.control) == control_before


# ── one trace, client to consumer to reply ──


def by_name(spans: Sequence[ReadableSpan], name: str, trace_id: int) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name and s.context.trace_id == trace_id]


async def test_one_trace_runs_from_the_client_publish_through_the_consumer_to_the_reply(
    running: Running,
) -> None:
    client_spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(client_spans))
    correlation_id = uuid.uuid4().hex
    async with OperationsClient(
        running.bootstrap,
        request_topic=running.topics.requests,
        reply_topic=running.topics.replies,
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        timeout_s=30,
        key_id=KEY_B,
        secret=SECRET_B,
        tracer=provider.get_tracer("test-client"),
    ) as client:
        reply = await client.request(
            {
                "operation": "chat",
                "tenant_id": TENANT_B,
                "messages": [{"role": "user", "content": "trace me"}],
                "max_tokens": 8,
            },
            correlation_id=correlation_id,
        )
    assert reply.status == "ok", reply.error

    (publish_span,) = [s for s in client_spans.get_finished_spans() if s.kind == SpanKind.PRODUCER]
    assert publish_span.name == f"send {running.topics.requests}"
    trace_id = publish_span.context.trace_id
    process_name = f"process {running.topics.requests}"
    await wait_until(
        lambda: by_name(running.spans.get_finished_spans(), process_name, trace_id),
        10,
        what="the consumer span was exported",
    )
    finished = running.spans.get_finished_spans()
    (process_span,) = by_name(finished, process_name, trace_id)
    assert process_span.kind == SpanKind.CONSUMER
    assert process_span.parent is not None
    assert process_span.parent.span_id == publish_span.context.span_id
    for child in ("opstream.auth", "opstream.prompt", "opstream.quota", "opstream.generate"):
        (span,) = by_name(finished, child, trace_id)
        assert span.parent is not None and span.parent.span_id == process_span.context.span_id

    reply_record = await find_record(running.bootstrap, running.topics.replies, correlation_id)
    traceparent = header(reply_record, "traceparent")
    assert traceparent is not None
    _version, reply_trace, reply_parent, _flags = traceparent.split("-")
    assert int(reply_trace, 16) == trace_id
    assert int(reply_parent, 16) == process_span.context.span_id


# ── health and metrics ──


async def test_health_reports_the_documented_fields(running: Running) -> None:
    status, body = await running.get_json("/health")
    assert status == 200
    assert body["status"] == "healthy"
    assert body["uptime_seconds"] > 0
    assert body["memory"]["rss_mb"] > 0
    assert {"percent", "system_percent"} <= body["memory"].keys()
    assert {"percent", "process_percent"} <= body["cpu"].keys()
    assert body["models"] == [{"name": "fake-model", "backend": "fake", "loaded": True}]
    assert "available" in body["gpu"]
    assert body["broker"]["connected"] is True


def requests_total(metrics: str, **labels: str) -> float:
    """The sum of the `opstream_requests_total` series whose labels include `labels`."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "opstream_requests_total" and labels.items() <= sample.labels.items()
    )


async def test_metrics_expose_request_token_and_latency_series(running: Running) -> None:
    before = await running.metrics()
    # This test's own traffic: one request served, one refused (unsigned).
    body = chat_body(TENANT_A)
    refused_id = await publish(running, body, key=TENANT_A)
    refused = await find_record(running.bootstrap, running.topics.replies, refused_id)
    refusal = OperationReply.model_validate_json(refused.value).error
    assert refusal is not None and refusal.code == "unauthorized", refusal
    async with OperationsClient(
        running.bootstrap,
        request_topic=running.topics.requests,
        reply_topic=running.topics.replies,
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        timeout_s=30,
        key_id=KEY_A,
        secret=SECRET_A,
    ) as client:
        reply = await client.chat(
            tenant_id=TENANT_A, messages=[{"role": "user", "content": "count me"}], max_tokens=8
        )
    assert reply.status == "ok"

    async def counted() -> str | None:
        text = await running.metrics()
        served = requests_total(text, status="ok") - requests_total(before, status="ok")
        unauthorized = requests_total(text, code="unauthorized") - requests_total(
            before, code="unauthorized"
        )
        return text if served >= 1 and unauthorized >= 1 else None

    # Refused requests are counted by their code, served ones by their status.
    text = await wait_until(counted, 10, what="the served and the refused request counted")
    assert "opstream_tokens_total{" in text
    assert "opstream_request_duration_milliseconds_bucket{" in text
    assert "opstream_queue_duration_milliseconds_bucket{" in text


def put_limits(running: Running, body: dict[str, Any]) -> tuple[int, bytes]:
    """PUT /limits with the admin key (blocking; run it in a thread)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{running.port}/limits",
        data=json.dumps(body).encode(),
        headers={"X-Admin-Key": ADMIN_KEY, "Content-Type": "application/json"},
        method="PUT",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read()


async def test_every_series_the_grafana_dashboard_queries_is_on_the_consumer_metrics_endpoint(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake engine runs on no GPU; give it the details exllamav2 reports so that the
    # GPU memory gauges have a device to export, as they do in production.
    gpu = {"index": 0, "name": "Tesla T4", "memory_used_bytes": 2**33, "memory_total_bytes": 2**34}
    monkeypatch.setattr(
        running.engine, "_info", replace(running.engine.info, details={"gpus": [gpu]})
    )
    # Tenant A's translations (the other tests only chat): limited to none today, so one is
    # refused by the quota and counted as a quota rejection.
    blocked = {"tenant_id": TENANT_A, "operation": "translate"}
    status, body = await asyncio.to_thread(put_limits, running, {**blocked, "daily_limit": 0})
    assert status == 200, body
    try:
        async with OperationsClient(
            running.bootstrap,
            request_topic=running.topics.requests,
            reply_topic=running.topics.replies,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            timeout_s=30,
            key_id=KEY_A,
            secret=SECRET_A,
        ) as client:
            refused = await client.translate(tenant_id=TENANT_A, text="hallo", target_language="en")
            served = await client.chat(
                tenant_id=TENANT_A, messages=[{"role": "user", "content": "chart me"}]
            )
    finally:
        await asyncio.to_thread(put_limits, running, {**blocked, "daily_limit": None})
    assert refused.error is not None and refused.error.code == "quota_exceeded", refused.error
    assert served.status == "ok", served.error

    wanted = dashboard_metric_names(load_dashboard())
    missing = set(wanted)

    async def all_exported() -> bool:
        nonlocal missing
        missing = wanted - exported_series(await running.metrics())
        return not missing

    await wait_until(all_exported, 10, interval_s=0.2, raise_on_timeout=False)
    assert not missing, f"the dashboard queries series /metrics does not export: {missing}"

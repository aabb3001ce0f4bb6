"""RequestProcessor with the fake engine and an in-memory publisher: one reply or dead letter
per record, error replies for every request failure, never any prompt text in errors."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from consumer.bus.connection import KafkaConnection
from consumer.bus.records import InboundRecord
from consumer.engine.base import EngineError, EngineOverloaded, WorkCancelled, WorkExpired
from consumer.pipeline import RequestProcessor
from consumer.settings import OperationLimits, StreamSettings
from schemas.headers import (
    CHUNK_SEQ,
    CORRELATION_ID,
    DLQ_INSTANCE,
    DLQ_ORIGIN_OFFSET,
    DLQ_ORIGIN_PARTITION,
    DLQ_ORIGIN_TOPIC,
    DLQ_REASON,
    REPLY_TO,
)
from schemas.replies import CancelResult, OperationReply, StreamChunk
from tests.support.fake_engine import FakeEngine
from tests.support.waiting import wait_until
from topics.catalog import TopicSettings

TOPICS = TopicSettings(requests="ops.requests.v1", replies="ops.replies.v1", dlq="ops.dlq.v1")
SECRET = "PROMPT-TEXT-that-must-never-leak"


@dataclass
class Sent:
    topic: str
    value: bytes
    key: bytes | None
    headers: dict[str, str]
    partition: int | None = None
    raw_headers: tuple[tuple[str, bytes], ...] = ()


class MemoryPublisher:
    """A RecordPublisher that keeps what was sent (and can be told to fail)."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.fail: Exception | None = None

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        if self.fail is not None:
            raise self.fail
        decoded = {k: v.decode("utf-8", "replace") for k, v in headers}
        self.sent.append(Sent(topic, value, key, decoded, partition, tuple(headers)))

    def to(self, topic: str) -> list[Sent]:
        return [s for s in self.sent if s.topic == topic]

    def reply(self) -> OperationReply:
        (only,) = self.to(TOPICS.replies)
        return OperationReply.model_validate_json(only.value)


def make_processor(
    engine: FakeEngine | None = None, limits: OperationLimits | None = None
) -> tuple[RequestProcessor, FakeEngine, MemoryPublisher]:
    engine = engine or FakeEngine()
    publisher = MemoryPublisher()
    processor = RequestProcessor(
        engine=engine,
        publisher=publisher,
        topics=TOPICS,
        limits=limits or OperationLimits(),
        instance_id="unit-1",
    )
    return processor, engine, publisher


_offsets = iter(range(10_000))


def record(
    body: Any,
    *,
    correlation_id: str | None = "cid-1",
    reply_to: str | None = TOPICS.replies,
    produced_ms: int | None = None,
) -> InboundRecord:
    value = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers: list[tuple[str, bytes]] = []
    if correlation_id is not None:
        headers.append((CORRELATION_ID, correlation_id.encode()))
    if reply_to is not None:
        headers.append((REPLY_TO, reply_to.encode()))
    now = time.time()
    return InboundRecord(
        topic=TOPICS.requests,
        partition=3,
        offset=next(_offsets),
        key=b"tenant-a",
        value=value,
        headers=tuple(headers),
        timestamp_ms=produced_ms if produced_ms is not None else int(now * 1000),
        received_at=now,
    )


BODIES: dict[str, dict[str, Any]] = {
    "summarize": {"operation": "summarize", "tenant_id": "tenant-a",
                  "text": "First point. Second point. Third point.", "max_sentences": 2},
    "translate": {"operation": "translate", "tenant_id": "tenant-a", "text": "Hello there.",
                  "source_language": "en", "target_language": "de"},
    "classify": {"operation": "classify", "tenant_id": "tenant-a", "text": "Goal!",
                 "categories": ["sports", "finance", "weather"]},
    "chat": {"operation": "chat", "tenant_id": "tenant-a",
             "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
}  # fmt: skip


@pytest.mark.parametrize("operation", list(BODIES))
async def test_each_operation_gets_one_ok_reply_with_meta(operation: str) -> None:
    processor, engine, publisher = make_processor()
    outcome = await processor.process(record(BODIES[operation], correlation_id=f"c-{operation}"))

    assert outcome.status == "ok"
    assert outcome.operation == operation
    assert outcome.request_id == f"c-{operation}"
    assert engine.calls == 1
    (sent,) = publisher.sent
    assert sent.topic == TOPICS.replies
    assert sent.key == b"tenant-a"
    assert sent.headers[CORRELATION_ID] == f"c-{operation}"
    reply = publisher.reply()
    assert reply.status == "ok" and reply.error is None
    assert reply.meta.operation == operation
    assert reply.meta.model_used == "fake-model"
    assert reply.meta.request_id == f"c-{operation}"
    assert reply.meta.input_chars == outcome.input_chars > 0
    result = reply.model_dump()["result"]
    if operation == "summarize":
        assert result["sentence_count"] <= 2
    elif operation == "translate":
        assert (result["source_language"], result["target_language"]) == ("en", "de")
    elif operation == "classify":
        assert result["label"] == "sports"  # the fake engine likes the first candidate most
        assert sum(result["scores"].values()) == pytest.approx(1.0)
    else:
        assert result["finish_reason"] == "stop"
        assert result["message"]["role"] == "assistant"


async def test_request_id_in_body_is_kept_and_correlation_id_comes_from_header() -> None:
    processor, _, publisher = make_processor()
    body = {**BODIES["classify"], "request_id": "idem-7"}
    outcome = await processor.process(record(body, correlation_id="corr-7"))
    assert outcome.request_id == "idem-7"
    assert publisher.to(TOPICS.replies)[0].headers[CORRELATION_ID] == "corr-7"


async def test_request_id_stands_in_for_a_missing_correlation_header() -> None:
    processor, _, publisher = make_processor()
    body = {**BODIES["classify"], "request_id": "idem-8"}
    await processor.process(record(body, correlation_id=None))
    assert publisher.to(TOPICS.replies)[0].headers[CORRELATION_ID] == "idem-8"


async def test_missing_reply_to_uses_the_default_reply_topic() -> None:
    processor, _, publisher = make_processor()
    await processor.process(record(BODIES["chat"], reply_to=None))
    assert [s.topic for s in publisher.sent] == [TOPICS.replies]


async def test_invalid_request_gets_validation_error_and_never_runs() -> None:
    processor, engine, publisher = make_processor()
    body = {"operation": "classify", "tenant_id": "tenant-a", "text": SECRET * 100,
            "categories": ["only-one"], "unknown": 1}  # fmt: skip
    outcome = await processor.process(record(body))

    assert engine.calls == 0
    assert outcome.status == "error" and outcome.error_code == "validation"
    reply = publisher.reply()
    assert reply.status == "error" and reply.result is None
    assert reply.error is not None
    assert reply.error.code == "validation" and reply.error.http_status == 422
    assert not reply.error.retryable
    locs = {tuple(e.loc) for e in reply.error.errors or []}
    assert {("classify", "text"), ("classify", "categories"), ("classify", "unknown")} <= locs
    assert SECRET not in publisher.sent[0].value.decode()


async def test_unknown_operation_is_a_validation_error() -> None:
    processor, _, publisher = make_processor()
    outcome = await processor.process(record({"operation": "poem", "tenant_id": "tenant-a"}))
    assert outcome.error_code == "validation"
    assert outcome.operation is None
    assert publisher.reply().error.code == "validation"  # type: ignore[union-attr]


async def test_chat_over_configured_limits_is_a_validation_error() -> None:
    limits = OperationLimits(chat_max_messages=2, chat_max_output_tokens=8)
    processor, engine, publisher = make_processor(limits=limits)
    body = {"operation": "chat", "tenant_id": "tenant-a", "max_tokens": 9,
            "messages": [{"role": "user", "content": "a"}] * 3}  # fmt: skip
    await processor.process(record(body))
    reply = publisher.reply()
    assert reply.error is not None and reply.error.code == "validation"
    assert {tuple(e.loc) for e in reply.error.errors or []} == {("messages",), ("max_tokens",)}
    assert engine.calls == 0


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xfe\x80", "not UTF-8"),
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "not an object"),
        (b"", "empty body"),
        (None, "empty body"),
    ],
)
async def test_undecodable_record_is_dead_lettered_with_its_origin(
    value: bytes | None, reason: str
) -> None:
    processor, engine, publisher = make_processor()
    inbound = record(value, correlation_id=None)
    outcome = await processor.process(inbound)

    assert outcome.status == "dlq"
    assert engine.calls == 0
    (dead,) = publisher.sent
    assert dead.topic == TOPICS.dlq
    assert dead.value == (value or b"")
    assert dead.key == inbound.key
    assert dead.headers[DLQ_ORIGIN_TOPIC] == TOPICS.requests
    assert dead.headers[DLQ_ORIGIN_PARTITION] == "3"
    assert dead.headers[DLQ_ORIGIN_OFFSET] == str(inbound.offset)
    assert dead.headers[DLQ_INSTANCE] == "unit-1"
    assert reason in dead.headers[DLQ_REASON]
    assert dead.headers[REPLY_TO] == TOPICS.replies  # original headers travel along


async def test_undecodable_record_with_correlation_id_also_gets_an_error_reply() -> None:
    processor, _, publisher = make_processor()
    outcome = await processor.process(record(b"{oops", correlation_id="c-oops"))
    assert outcome.status == "dlq"
    assert [s.topic for s in publisher.sent] == [TOPICS.dlq, TOPICS.replies]
    reply = publisher.reply()
    assert reply.error is not None and reply.error.code == "validation"
    assert publisher.to(TOPICS.replies)[0].headers[CORRELATION_ID] == "c-oops"


@pytest.mark.parametrize("reply_to", [TOPICS.requests, TOPICS.dlq, "ops.control.v1", "other"])
async def test_reply_to_outside_the_allowed_topics_is_dead_lettered(reply_to: str) -> None:
    processor, engine, publisher = make_processor()
    outcome = await processor.process(record(BODIES["chat"], reply_to=reply_to))
    assert outcome.status == "dlq"
    assert engine.calls == 0
    (dead,) = publisher.sent
    assert dead.topic == TOPICS.dlq
    assert "not allowed" in dead.headers[DLQ_REASON]


async def test_record_without_any_correlation_is_dead_lettered() -> None:
    processor, _, publisher = make_processor()
    outcome = await processor.process(record(BODIES["chat"], correlation_id=None))
    assert outcome.status == "dlq"
    assert [s.topic for s in publisher.sent] == [TOPICS.dlq]
    assert "correlation_id" in publisher.sent[0].headers[DLQ_REASON]


async def test_request_past_its_deadline_is_answered_without_running() -> None:
    processor, engine, publisher = make_processor()
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    outcome = await processor.process(record({**BODIES["summarize"], "deadline": past}))
    assert engine.calls == 0
    assert outcome.error_code == "deadline_exceeded"
    error = publisher.reply().error
    assert error is not None and error.code == "deadline_exceeded" and error.http_status == 504


async def test_timeout_ms_counts_from_when_the_record_was_produced() -> None:
    processor, engine, publisher = make_processor()
    produced = int((time.time() - 10) * 1000)
    body = {**BODIES["translate"], "timeout_ms": 1000}
    await processor.process(record(body, produced_ms=produced))
    assert engine.calls == 0
    assert publisher.reply().error.code == "deadline_exceeded"  # type: ignore[union-attr]


async def test_request_within_its_deadline_runs() -> None:
    processor, engine, publisher = make_processor()
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    await processor.process(record({**BODIES["summarize"], "deadline": future}))
    assert engine.calls == 1
    assert publisher.reply().status == "ok"


@pytest.mark.parametrize("operation", ["chat", "classify"])
async def test_the_engine_is_told_tenant_priority_deadline_and_cancel_key(operation: str) -> None:
    processor, engine, publisher = make_processor()
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    body = {**BODIES[operation], "priority": "batch", "deadline": deadline.isoformat()}
    body["request_id"] = "r-7"
    await processor.process(record(body))
    assert publisher.reply().status == "ok"
    (work,) = engine.works
    assert (work.tenant, work.priority, work.key) == ("tenant-a", "batch", "tenant-a\x00r-7")
    assert work.deadline == pytest.approx(deadline.timestamp())


async def test_priority_defaults_to_interactive_and_rejects_anything_else() -> None:
    processor, engine, publisher = make_processor()
    await processor.process(record(BODIES["chat"], correlation_id="c-default"))
    assert engine.works[0].priority == "interactive"
    publisher.sent.clear()
    await processor.process(record({**BODIES["chat"], "priority": "urgent"}))
    assert publisher.reply().error.code == "validation"  # type: ignore[union-attr]


async def test_deadline_passing_in_the_engines_queue_is_deadline_exceeded_and_free() -> None:
    processor, engine, publisher = make_processor()
    engine.raise_next = WorkExpired("the deadline passed while the request waited to run")
    outcome = await processor.process(record(BODIES["chat"]))
    assert outcome.error_code == "deadline_exceeded"
    assert (outcome.input_tokens, outcome.output_tokens) == (0, 0)
    error = publisher.reply().error
    assert error is not None and error.http_status == 504 and not error.retryable


async def test_a_full_engine_queue_is_a_retryable_overloaded_reply() -> None:
    processor, engine, publisher = make_processor()
    engine.raise_next = EngineOverloaded("32 requests are queued (the limit)")
    outcome = await processor.process(record(BODIES["summarize"]))
    assert outcome.error_code == "overloaded"
    error = publisher.reply().error
    assert error is not None and error.http_status == 503 and error.retryable


async def test_engine_failure_is_a_retryable_internal_error_and_the_next_request_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    processor, engine, publisher = make_processor()
    caplog.set_level(logging.DEBUG)
    content = f"{SECRET} __engine_failure__"
    failing = {"operation": "chat", "tenant_id": "tenant-a",
               "messages": [{"role": "user", "content": content}]}  # fmt: skip
    outcome = await processor.process(record(failing, correlation_id="c-fail"))
    assert outcome.status == "error" and outcome.error_code == "internal"
    reply = publisher.reply()
    assert reply.error is not None
    assert reply.error.code == "internal" and reply.error.retryable is True
    assert reply.error.http_status == 500
    assert SECRET not in publisher.sent[0].value.decode()
    assert SECRET not in caplog.text

    publisher.sent.clear()
    outcome = await processor.process(record(BODIES["chat"], correlation_id="c-next"))
    assert outcome.status == "ok"
    assert publisher.reply().status == "ok"
    assert engine.calls == 2


async def test_a_bug_in_serving_becomes_a_retryable_internal_error() -> None:
    class BrokenEngine(FakeEngine):
        async def score(self, messages: Any, candidates: Any, work: Any = None) -> Any:
            raise RuntimeError(f"bug while scoring {messages[-1].content}")

    processor, _, publisher = make_processor(engine=BrokenEngine())
    body = {**BODIES["classify"], "text": SECRET}
    outcome = await processor.process(record(body))
    assert outcome.error_code == "internal"
    error = publisher.reply().error
    assert error is not None and error.retryable is True
    assert SECRET not in publisher.sent[0].value.decode()


async def test_broker_failure_propagates_so_the_record_stays_uncommitted() -> None:
    processor, _, publisher = make_processor()
    publisher.fail = ConnectionError("broker down")
    with pytest.raises(ConnectionError):
        await processor.process(record(BODIES["chat"]))


# ── quotas on: forwarding, request-reply conventions, request identity ──


class InstantStateProducer:
    """Stands in for the state-topic producer: every write is acknowledged at once."""

    def __init__(self) -> None:
        self.writes = 0

    async def send(self, topic: str, **_: object) -> Any:
        import asyncio

        self.writes += 1
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def quota_processor(requests_per_day: int = 10) -> tuple[RequestProcessor, MemoryPublisher]:
    from zoneinfo import ZoneInfo

    from consumer.quota.ledger import QuotaLedger
    from consumer.quota.limit_book import LimitBook, limit_defaults
    from consumer.quota.store import QuotaStore
    from consumer.settings.quota import QuotaSettings

    settings = QuotaSettings(default_daily_requests=requests_per_day)
    book = LimitBook(limit_defaults(settings))
    store = QuotaStore(
        book=book,
        settings=settings,
        producer=InstantStateProducer(),  # type: ignore[arg-type]
        connection=KafkaConnection("unused:9092"),
    )
    for partition in range(TOPICS.request_partitions):
        store._ledgers[partition] = QuotaLedger(partition, book, ZoneInfo("UTC"))
    publisher = MemoryPublisher()
    processor = RequestProcessor(
        engine=FakeEngine(),
        publisher=publisher,
        topics=TOPICS,
        limits=OperationLimits(),
        instance_id="unit-q",
        quota=store,
    )
    return processor, publisher


def keyed(
    tenant: str,
    body: dict[str, Any],
    *,
    partition: int | None = None,
    headers: tuple[tuple[str, bytes], ...] | None = None,
    key: bytes | None = None,
    offset: int | None = None,
) -> InboundRecord:
    from consumer.quota.partitions import partition_for_tenant

    now = time.time()
    return InboundRecord(
        topic=TOPICS.requests,
        partition=partition_for_tenant(tenant, TOPICS.request_partitions)
        if partition is None
        else partition,
        offset=next(_offsets) if offset is None else offset,
        key=tenant.encode() if key is None else key,
        value=json.dumps({**body, "tenant_id": tenant}).encode(),
        headers=headers if headers is not None else ((CORRELATION_ID, b"cid-q"),),
        timestamp_ms=int(now * 1000),
        received_at=now,
    )


def foreign_partition(tenant: str) -> int:
    from consumer.quota.partitions import partition_for_tenant

    return (partition_for_tenant(tenant, TOPICS.request_partitions) + 1) % TOPICS.request_partitions


async def test_a_record_on_a_foreign_partition_is_forwarded_unchanged_to_its_tenant() -> None:
    from consumer.quota.partitions import partition_for_tenant
    from schemas.headers import FORWARDED_FROM

    processor, publisher = quota_processor()
    original = keyed("acme", BODIES["summarize"], partition=foreign_partition("acme"))
    outcome = await processor.process(original)
    assert outcome.status == "forwarded"
    (copy,) = publisher.sent
    assert copy.topic == TOPICS.requests
    assert copy.partition == partition_for_tenant("acme", TOPICS.request_partitions)
    assert (copy.key, copy.value) == (original.key, original.value)
    assert copy.raw_headers[: len(original.headers)] == original.headers
    assert (
        copy.headers[FORWARDED_FROM] == f"{TOPICS.requests}/{original.partition}/{original.offset}"
    )


async def test_a_forwarded_copy_is_answered_on_the_tenants_partition() -> None:
    from schemas.headers import FORWARDED_FROM

    processor, publisher = quota_processor()
    copy = keyed(
        "acme", BODIES["summarize"], headers=((CORRELATION_ID, b"c"), (FORWARDED_FROM, b"t/1/2"))
    )
    outcome = await processor.process(copy)
    assert outcome.status == "ok"
    assert publisher.reply().status == "ok"


async def test_a_forwarded_record_still_misplaced_is_refused_not_forwarded_again() -> None:
    from schemas.headers import FORWARDED_FROM

    processor, publisher = quota_processor()
    stray = keyed(
        "acme",
        BODIES["summarize"],
        partition=foreign_partition("acme"),
        headers=((CORRELATION_ID, b"c"), (FORWARDED_FROM, b"t/1/2")),
    )
    await processor.process(stray)
    reply = publisher.reply()  # answered, and nothing written to the request topic
    assert reply.error is not None and reply.error.code == "validation"
    assert "partition count" in reply.error.message


@pytest.mark.parametrize("key", [b"", b"someone-else"])
async def test_a_record_not_keyed_by_its_tenant_gets_a_clear_error(key: bytes) -> None:
    from consumer.quota.partitions import partition_for_key

    processor, publisher = quota_processor()
    # On the key's own partition (where a record keyed by another value is forwarded to).
    partition = partition_for_key(key, TOPICS.request_partitions) if key else None
    await processor.process(keyed("acme", BODIES["summarize"], key=key, partition=partition))
    reply = publisher.reply()
    assert reply.error is not None and reply.error.code == "validation"
    assert "key" in reply.error.message
    assert publisher.to(TOPICS.requests) == []


async def test_spring_request_reply_headers_are_answered_with_the_same_bytes_and_partition() -> (
    None
):
    correlation = bytes(range(16))
    processor, publisher = quota_processor()
    request = keyed(
        "acme",
        BODIES["classify"],
        headers=(
            ("kafka_correlationId", correlation),
            ("kafka_replyTopic", TOPICS.replies.encode()),
            ("kafka_replyPartition", (1).to_bytes(4, "big")),
        ),
    )
    outcome = await processor.process(request)
    (reply,) = publisher.to(TOPICS.replies)
    assert reply.partition == 1
    assert ("kafka_correlationId", correlation) in reply.raw_headers
    assert outcome.request_id == correlation.hex()


async def test_reusing_a_request_id_with_another_body_is_refused_and_not_run() -> None:
    processor, publisher = quota_processor()
    body = {**BODIES["chat"], "request_id": "same"}
    assert (await processor.process(keyed("acme", body))).status == "ok"
    other = {**body, "messages": [{"role": "user", "content": "something else"}]}
    outcome = await processor.process(keyed("acme", other))
    reply = OperationReply.model_validate_json(publisher.to(TOPICS.replies)[-1].value)
    assert reply.error is not None and reply.error.code == "duplicate_request"
    assert reply.error.original_status == "ok" and reply.error.http_status == 409
    assert outcome.request_id is None  # its usage row does not stand in for the original's


async def test_a_verbatim_copy_of_a_record_is_not_run_again_but_gets_its_stored_reply() -> None:
    processor, publisher = quota_processor()
    first = keyed("acme", BODIES["chat"])
    await processor.process(first)
    copy = InboundRecord(
        **{**{f: getattr(first, f) for f in first.__slots__}, "offset": first.offset + 1}
    )
    outcome = await processor.process(copy)
    assert outcome.replayed and outcome.status == "ok"
    original, replayed = (
        OperationReply.model_validate_json(s.value) for s in publisher.to(TOPICS.replies)
    )
    assert replayed.result == original.result and replayed.meta.replayed is True


async def test_the_same_record_redelivered_is_answered_again() -> None:
    processor, publisher = quota_processor(requests_per_day=1)
    first = keyed("acme", BODIES["chat"])
    await processor.process(first)
    again = await processor.process(first)
    assert again.status == "ok"
    assert [
        OperationReply.model_validate_json(s.value).status for s in publisher.to(TOPICS.replies)
    ] == ["ok", "ok"]


@pytest.mark.parametrize(
    ("failure", "code", "counts"),
    [
        (WorkExpired("the deadline passed in the queue"), "deadline_exceeded", False),
        (EngineOverloaded("the queue is full"), "overloaded", False),
        (WorkCancelled("", 0, 0), "cancelled", False),  # cancelled before it started
        (WorkCancelled("some", 12, 3), "cancelled", True),  # cancelled while it ran
        (EngineError("the backend failed", retryable=True), "internal", True),
    ],
)
async def test_work_that_never_ran_leaves_the_quota_untouched_and_work_that_ran_counts(
    failure: Exception, code: str, counts: bool
) -> None:
    processor, _publisher = quota_processor(requests_per_day=1)
    engine = processor._engine
    assert isinstance(engine, FakeEngine)
    engine.raise_next = failure  # type: ignore[assignment]
    first = await processor.process(keyed("acme", {**BODIES["chat"], "request_id": "first"}))
    assert first.error_code == code
    second = await processor.process(keyed("acme", {**BODIES["chat"], "request_id": "second"}))
    assert second.error_code == ("quota_exceeded" if counts else None)


async def test_a_request_counts_as_in_flight_while_the_engine_runs_it() -> None:
    import asyncio

    from prometheus_client.parser import text_string_to_metric_families

    from consumer.observability.telemetry import Telemetry, TelemetrySettings

    telemetry = Telemetry(TelemetrySettings(), instance_id="unit-m")

    def in_flight() -> float:
        text = telemetry.prometheus_text().decode()
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "opstream_requests_in_flight" and s.labels.get("operation") == "chat"
        )

    processor = RequestProcessor(
        engine=FakeEngine(delay_s=0.3),
        publisher=MemoryPublisher(),
        topics=TOPICS,
        limits=OperationLimits(),
        instance_id="unit-m",
        telemetry=telemetry,
    )
    running = asyncio.create_task(processor.process(record(BODIES["chat"])))
    await wait_until(lambda: in_flight() == 1, 5, what="the chat request counted in flight")
    await running
    assert in_flight() == 0
    telemetry.shutdown()


# -- streaming and cancel ---------------------------------------------------------------


def chunks_and_reply(publisher: MemoryPublisher) -> tuple[list[StreamChunk], OperationReply]:
    records = publisher.to(TOPICS.replies)
    chunks = [StreamChunk.model_validate_json(r.value) for r in records[:-1]]
    for record, chunk in zip(records, chunks, strict=False):
        assert record.headers[CHUNK_SEQ] == str(chunk.seq)
        assert record.headers[CORRELATION_ID] == "cid-1"
    assert CHUNK_SEQ not in records[-1].headers
    return chunks, OperationReply.model_validate_json(records[-1].value)


@pytest.mark.parametrize("chunk_tokens", [1, 3, 100])
async def test_a_streamed_chat_sends_numbered_chunks_then_the_full_reply(chunk_tokens: int) -> None:
    processor, _engine, publisher = make_processor()
    processor._streaming = StreamSettings(chunk_tokens=chunk_tokens, chunk_ms=10_000)
    body = {**BODIES["chat"], "max_tokens": 6, "stream": True, "request_id": "s-1"}
    outcome = await processor.process(record(body))
    assert outcome.status == "ok"
    chunks, reply = chunks_and_reply(publisher)
    assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))
    assert len(chunks) == -(-7 // chunk_tokens)  # 6 words and a full stop, coalesced
    assert all(c.request_id == "s-1" for c in chunks)
    assert reply.status == "ok"
    assert "".join(c.delta for c in chunks) == reply.result.message.content  # type: ignore[union-attr]


async def test_chunks_are_also_sent_after_a_pause_not_only_when_full() -> None:
    processor, engine, publisher = make_processor()
    processor._streaming = StreamSettings(chunk_tokens=1_000, chunk_ms=5)
    engine.hold = asyncio.Event()
    body = {**BODIES["chat"], "max_tokens": 4, "stream": True}
    task = asyncio.create_task(processor.process(record(body)))
    await wait_until(lambda: publisher.to(TOPICS.replies), what="the first chunk, by time")
    assert StreamChunk.model_validate_json(publisher.to(TOPICS.replies)[0].value).delta == "word"
    engine.hold.set()
    await task
    chunks, reply = chunks_and_reply(publisher)
    assert reply.status == "ok" and len(chunks) >= 2


async def test_a_request_without_stream_gets_no_chunks() -> None:
    processor, _engine, publisher = make_processor()
    await processor.process(record(BODIES["summarize"]))
    assert publisher.reply().status == "ok"  # exactly one record on the reply topic


def cancel_body(tenant: str = "tenant-a", request_id: str = "r-1") -> dict[str, Any]:
    return {"operation": "cancel", "tenant_id": tenant, "request_id": request_id}


async def test_cancelling_a_running_request_answers_both_and_counts_what_ran() -> None:
    processor, engine, publisher = make_processor()
    engine.hold = asyncio.Event()
    body = {**BODIES["chat"], "max_tokens": 8, "request_id": "r-1", "stream": True}
    running = asyncio.create_task(processor.process(record(body)))
    await wait_until(lambda: engine._running, what="generation started")
    cancel = await processor.process(record(cancel_body(), correlation_id="cid-cancel"))
    assert cancel.status == "ok" and cancel.operation == "cancel"
    outcome = await running
    assert (outcome.status, outcome.error_code) == ("error", "cancelled")
    assert outcome.output_tokens == 1 and outcome.input_tokens > 0
    by_cid = {r.headers[CORRELATION_ID]: r for r in publisher.to(TOPICS.replies)}
    cancel_reply = OperationReply.model_validate_json(by_cid["cid-cancel"].value)
    assert cancel_reply.result == CancelResult(request_id="r-1", cancelled=True)
    # Its meta names the cancel itself (by its correlation id), as every reply's meta does.
    assert (cancel_reply.meta.operation, cancel_reply.meta.request_id) == ("cancel", "cid-cancel")
    cancelled = OperationReply.model_validate_json(publisher.to(TOPICS.replies)[-1].value)
    assert cancelled.error is not None and cancelled.error.code == "cancelled"
    assert (cancelled.error.http_status, cancelled.error.retryable) == (499, False)
    assert cancelled.meta.output_tokens == 1
    assert cancelled.meta.execution_time_ms > 0  # it ran until the cancel


async def test_a_cancel_for_nothing_open_is_acknowledged_harmlessly() -> None:
    processor, engine, publisher = make_processor()
    outcome = await processor.process(record(cancel_body(request_id="never-sent")))
    assert outcome.status == "ok"
    assert publisher.reply().result == CancelResult(request_id="never-sent", cancelled=False)
    assert engine.calls == 0


async def test_a_cancel_cannot_reach_another_tenants_request() -> None:
    processor, engine, publisher = make_processor()
    engine.hold = asyncio.Event()
    body = {**BODIES["chat"], "request_id": "r-1"}
    running = asyncio.create_task(processor.process(record(body)))
    await wait_until(lambda: engine._running, what="generation started")
    await processor.process(record(cancel_body(tenant="tenant-b"), correlation_id="cid-b"))
    engine.hold.set()
    assert (await running).status == "ok"
    by_cid = {r.headers[CORRELATION_ID]: r for r in publisher.to(TOPICS.replies)}
    refused = OperationReply.model_validate_json(by_cid["cid-b"].value)
    assert refused.result == CancelResult(request_id="r-1", cancelled=False)


async def test_an_invalid_cancel_is_a_validation_error() -> None:
    processor, _engine, publisher = make_processor()
    await processor.process(record({"operation": "cancel", "tenant_id": "tenant-a"}))
    error = publisher.reply().error
    assert error is not None and error.code == "validation"

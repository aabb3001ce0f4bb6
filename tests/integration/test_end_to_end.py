"""The whole service against a real broker: the real model answers every operation, bad
records go to the DLQ, and offsets survive a graceful restart but not a crash."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer

from consumer.bus.connection import KafkaConnection
from consumer.bus.topic_reader import read_to_end, standalone_consumer, topic_partitions
from opstream_client import OperationsClient
from schemas.headers import (
    CORRELATION_ID,
    DLQ_ORIGIN_OFFSET,
    DLQ_ORIGIN_PARTITION,
    DLQ_ORIGIN_TOPIC,
    DLQ_REASON,
    REPLY_TO,
)
from schemas.replies import OperationReply
from tests.support.harness import (
    FETCH_MAX_WAIT_MS,
    Broker,
    ConsumerProcess,
    TopicSet,
    base_settings,
    client_for,
    merge,
    new_topics,
    serving,
    start_consumer,
    wait_requests_finished,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

TENANT = "tenant-e2e"
REQUEST_TIMEOUT_S = 60.0
TEXT = (
    "Kafka is a distributed event log. Producers append records to topics, which are split "
    "into partitions. Consumers in a group share the partitions and commit their offsets, so "
    "a restarted consumer continues where its group left off."
)


@dataclass
class Record:
    """A record as read back from a topic (headers decoded to text)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]


async def read_topic(bootstrap: str, topic: str) -> list[Record]:
    """Every record currently in `topic`, read from the beginning without a consumer group."""
    consumer = standalone_consumer(KafkaConnection(bootstrap), fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic)
        return [
            Record(
                r.partition,
                r.offset,
                r.key,
                r.value,
                {k: (v or b"").decode("utf-8", "replace") for k, v in r.headers or ()},
            )
            async for r in read_to_end(consumer, topic, partitions, timeout_s=30.0)
        ]
    finally:
        await consumer.stop()


async def wait_for_records(
    bootstrap: str,
    topic: str,
    match: Callable[[Record], bool],
    count: int = 1,
    timeout_s: float = 30.0,
) -> list[Record]:
    """Poll `topic` until at least `count` records satisfy `match`."""
    found: list[Record] = []

    async def enough() -> bool:
        found[:] = [r for r in await read_topic(bootstrap, topic) if match(r)]
        return len(found) >= count

    await wait_until(enough, timeout_s, interval_s=0.2, raise_on_timeout=False)
    assert len(found) >= count, f"{len(found)} of {count} records in {topic}: {found}"
    return found


def with_header(name: str, value: str) -> Callable[[Record], bool]:
    return lambda record: record.headers.get(name) == value


@dataclass
class Live:
    """One real-model consumer shared by the module, its topics and a started client."""

    broker: Broker
    topics: TopicSet
    consumer: ConsumerProcess
    client: OperationsClient


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def live(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Live]:
    tmp = tmp_path_factory.mktemp("e2e")
    topics = await new_topics(broker)
    settings = merge(
        base_settings(broker, topics, tmp),
        {"engine": {"backend": "llamacpp", "llamacpp": {"n_ctx": 2048}}},
    )
    async with serving(broker, topics, settings, tmp / "consumer.log") as (consumer, client):
        yield Live(broker, topics, consumer, client)


def assert_ok_meta(reply: OperationReply, operation: str, request_id: str) -> None:
    assert reply.status == "ok", reply.error
    assert reply.error is None
    meta = reply.meta
    assert meta.operation == operation
    assert meta.request_id == request_id
    assert meta.model_used and "smollm2" in meta.model_used.lower()
    assert meta.input_chars > 0
    assert meta.input_tokens > 0
    assert meta.execution_time_ms > 0
    # Waiting and running both happen between the fetch and the reply (rounded to 0.001 ms).
    assert meta.total_ms is not None
    assert 0 <= meta.queue_ms and meta.queue_ms + meta.execution_time_ms <= meta.total_ms + 0.01


# ── the four operations, answered by the real model ──


async def test_summarize_reply_has_at_most_max_sentences(live: Live) -> None:
    cid = f"sum-{uuid.uuid4()}"
    reply = await live.client.request(
        {"operation": "summarize", "tenant_id": TENANT, "text": TEXT, "max_sentences": 2,
         "max_tokens": 48},
        correlation_id=cid,
    )  # fmt: skip
    assert_ok_meta(reply, "summarize", cid)
    result = reply.model_dump()["result"]
    assert 0 <= result["sentence_count"] <= 2
    assert reply.meta.input_chars == len(TEXT)
    assert reply.meta.output_tokens > 0


async def test_translate_reply_echoes_its_languages(live: Live) -> None:
    cid = f"tr-{uuid.uuid4()}"
    reply = await live.client.request(
        {"operation": "translate", "tenant_id": TENANT, "text": "Good morning, friends.",
         "source_language": "en", "target_language": "fr", "max_tokens": 24},
        correlation_id=cid,
    )  # fmt: skip
    assert_ok_meta(reply, "translate", cid)
    result = reply.model_dump()["result"]
    assert result["source_language"] == "en"
    assert result["target_language"] == "fr"
    assert isinstance(result["translated_text"], str)


async def test_classify_scores_are_probabilities_and_label_is_argmax(live: Live) -> None:
    cid = f"cls-{uuid.uuid4()}"
    categories = ["sports", "finance", "weather"]
    reply = await live.client.request(
        {"operation": "classify", "tenant_id": TENANT,
         "text": "The stock market fell three percent after the bank raised rates.",
         "categories": categories},
        correlation_id=cid,
    )  # fmt: skip
    assert_ok_meta(reply, "classify", cid)
    result = reply.model_dump()["result"]
    scores = result["scores"]
    assert set(scores) == set(categories)
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-6)
    assert all(0.0 <= p <= 1.0 for p in scores.values())
    assert result["label"] == max(scores, key=scores.__getitem__)
    assert result["confidence"] == pytest.approx(scores[result["label"]])


async def test_chat_reply_is_an_assistant_message_with_finish_reason(live: Live) -> None:
    cid = f"chat-{uuid.uuid4()}"
    reply = await live.client.request(
        {"operation": "chat", "tenant_id": TENANT, "max_tokens": 16, "temperature": 0.0,
         "messages": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "Name one colour."}]},
        correlation_id=cid,
    )  # fmt: skip
    assert_ok_meta(reply, "chat", cid)
    result = reply.model_dump()["result"]
    assert result["message"]["role"] == "assistant"
    assert result["finish_reason"] in ("stop", "length")
    assert 0 < reply.meta.output_tokens <= 16


# ── the wire contract without the client library ──


async def test_plain_kafka_producer_gets_reply_with_its_correlation_id(live: Live) -> None:
    cid = f"plain-{uuid.uuid4()}"
    body = {"operation": "classify", "tenant_id": TENANT, "text": "It rained all day.",
            "categories": ["weather", "sports"]}  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=live.broker.bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            live.topics.requests,
            json.dumps(body).encode(),
            key=TENANT.encode(),
            headers=[
                (CORRELATION_ID, cid.encode()),
                (REPLY_TO, live.topics.replies.encode()),
            ],
        )
    finally:
        await producer.stop()
    (record,) = await wait_for_records(
        live.broker.bootstrap, live.topics.replies, with_header(CORRELATION_ID, cid)
    )
    reply = OperationReply.model_validate_json(record.value or b"")
    assert reply.status == "ok"
    assert reply.meta.request_id == cid
    assert reply.meta.operation == "classify"


async def test_invalid_request_gets_validation_error_without_echoing_input(live: Live) -> None:
    cid = f"bad-{uuid.uuid4()}"
    secret = "SECRET-PROMPT-" + uuid.uuid4().hex
    reply = await live.client.request(
        {"operation": "translate", "tenant_id": TENANT, "text": secret * 400,
         "target_language": "not a language!", "colour": "blue"},
        correlation_id=cid,
    )  # fmt: skip
    assert reply.status == "error"
    assert reply.result is None
    assert reply.error is not None
    assert reply.error.code == "validation"
    assert reply.error.http_status == 422
    assert reply.error.retryable is False
    locs = {tuple(e.loc) for e in reply.error.errors or []}
    assert ("translate", "text") in locs
    assert ("translate", "target_language") in locs
    assert ("translate", "colour") in locs
    (raw,) = await wait_for_records(
        live.broker.bootstrap, live.topics.replies, with_header(CORRELATION_ID, cid)
    )
    assert secret not in (raw.value or b"").decode()
    assert "not a language" not in (raw.value or b"").decode()


# ── dead letters ──


async def test_garbage_records_are_dead_lettered_and_next_request_is_answered(live: Live) -> None:
    marker = uuid.uuid4().hex
    garbage = {
        "non-utf8": b"\xff\xfe\x00garbage\x80",
        "non-json": b"this is { not json",
        "json-array": b'[{"operation": "chat"}]',
    }
    producer = AIOKafkaProducer(bootstrap_servers=live.broker.bootstrap, acks="all")
    await producer.start()
    sent: dict[str, Any] = {}
    try:
        for name, value in garbage.items():
            sent[name] = await producer.send_and_wait(
                live.topics.requests,
                value,
                key=TENANT.encode(),
                headers=[("x-test-marker", marker.encode()), ("x-test-case", name.encode())],
            )
    finally:
        await producer.stop()

    cid = f"after-garbage-{uuid.uuid4()}"
    reply = await live.client.request(
        {"operation": "classify", "tenant_id": TENANT, "text": "A goal in the last minute.",
         "categories": ["sports", "weather"]},
        correlation_id=cid,
    )  # fmt: skip
    assert reply.status == "ok"

    dead = await wait_for_records(
        live.broker.bootstrap, live.topics.dlq, with_header("x-test-marker", marker), count=3
    )
    by_case = {r.headers["x-test-case"]: r for r in dead}
    assert set(by_case) == set(garbage)
    for name, record in by_case.items():
        metadata = sent[name]
        assert record.value == garbage[name]
        assert record.headers[DLQ_ORIGIN_TOPIC] == live.topics.requests
        assert record.headers[DLQ_ORIGIN_PARTITION] == str(metadata.partition)
        assert record.headers[DLQ_ORIGIN_OFFSET] == str(metadata.offset)
        assert record.headers[DLQ_REASON].startswith("undecodable")
    assert "UTF-8" in by_case["non-utf8"].headers[DLQ_REASON]
    assert "invalid JSON" in by_case["non-json"].headers[DLQ_REASON]
    assert "not an object" in by_case["json-array"].headers[DLQ_REASON]


@pytest.mark.parametrize("target", ["requests", "control"])
async def test_reply_to_own_topics_is_refused_and_dead_lettered(live: Live, target: str) -> None:
    reply_to = live.topics.requests if target == "requests" else live.topics.control
    cid = f"refused-{target}-{uuid.uuid4()}"
    body = {"operation": "classify", "tenant_id": TENANT, "text": "Sunny and warm.",
            "categories": ["weather", "sports"]}  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=live.broker.bootstrap, acks="all")
    await producer.start()
    try:
        metadata = await producer.send_and_wait(
            live.topics.requests,
            json.dumps(body).encode(),
            key=TENANT.encode(),
            headers=[(CORRELATION_ID, cid.encode()), (REPLY_TO, reply_to.encode())],
        )
    finally:
        await producer.stop()
    (record,) = await wait_for_records(
        live.broker.bootstrap, live.topics.dlq, with_header(CORRELATION_ID, cid)
    )
    assert record.headers[DLQ_ORIGIN_OFFSET] == str(metadata.offset)
    assert reply_to in record.headers[DLQ_REASON]
    assert "not allowed" in record.headers[DLQ_REASON]
    # Nothing was written where the request pointed: only the original request is there.
    if target == "control":
        assert not [r for r in await read_topic(live.broker.bootstrap, reply_to)
                    if r.headers.get(CORRELATION_ID) == cid]  # fmt: skip
    else:
        written = [r for r in await read_topic(live.broker.bootstrap, reply_to)
                   if r.headers.get(CORRELATION_ID) == cid]  # fmt: skip
        assert len(written) == 1 and written[0].offset == metadata.offset


# ── offsets across restarts (fake engine: these are about the plumbing) ──


def reply_counts(records: list[Record]) -> Counter[str]:
    return Counter(r.headers.get(CORRELATION_ID, "") for r in records)


async def send_all(client: OperationsClient, ids: list[str]) -> None:
    replies = await asyncio.gather(
        *(
            client.request(
                {"operation": "summarize", "tenant_id": f"tenant-{i % 3}", "text": "One. Two."},
                correlation_id=cid,
            )
            for i, cid in enumerate(ids)
        )
    )
    assert [r.status for r in replies] == ["ok"] * len(ids)


async def test_graceful_restart_does_not_answer_committed_requests_again(
    broker: Broker, tmp_path: Path
) -> None:
    topics = await new_topics(broker)
    settings = base_settings(broker, topics, tmp_path)
    first = await start_consumer(
        ConsumerProcess(settings, fake_engine=True, log_path=tmp_path / "a.log")
    )
    before = [f"before-{i}-{uuid.uuid4()}" for i in range(5)]
    try:
        async with client_for(broker, topics) as client:
            await send_all(client, before)
    finally:
        code = await asyncio.to_thread(first.stop)
    assert code == 0

    second = await start_consumer(
        ConsumerProcess(settings, fake_engine=True, log_path=tmp_path / "b.log")
    )
    try:
        after = f"after-{uuid.uuid4()}"
        async with client_for(broker, topics) as client:
            await send_all(client, [after])
        # A redelivered request would be answered before the group finishes everything sent.
        await wait_requests_finished(broker.bootstrap, topics, timeout_s=30)
        counts = reply_counts(await read_topic(broker.bootstrap, topics.replies))
    finally:
        await asyncio.to_thread(second.stop)
    assert counts[after] == 1
    assert {cid: counts[cid] for cid in before} == dict.fromkeys(before, 1)


async def test_crash_before_commit_redelivers_and_answers_again(
    broker: Broker, tmp_path: Path
) -> None:
    topics = await new_topics(broker)
    settings = base_settings(broker, topics, tmp_path)
    never_commits = merge(settings, {"intake": {"commit_interval_ms": 60_000}})
    crashing = await start_consumer(
        ConsumerProcess(never_commits, fake_engine=True, log_path=tmp_path / "a.log")
    )
    cid = f"crash-{uuid.uuid4()}"
    try:
        async with client_for(broker, topics) as client:
            await send_all(client, [cid])
    finally:
        await asyncio.to_thread(crashing.kill)
    assert reply_counts(await read_topic(broker.bootstrap, topics.replies))[cid] == 1

    successor = await start_consumer(
        ConsumerProcess(settings, fake_engine=True, log_path=tmp_path / "b.log")
    )
    try:
        answered_again = await wait_for_records(
            broker.bootstrap, topics.replies, with_header(CORRELATION_ID, cid), count=2
        )
    finally:
        await asyncio.to_thread(successor.stop)
    first, second = (OperationReply.model_validate_json(r.value or b"") for r in answered_again)
    assert first.status == second.status == "ok"
    assert first.meta.request_id == second.meta.request_id == cid

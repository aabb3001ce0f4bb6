"""The service as a stranger meets it: librdkafka (confluent-kafka) with default settings.

Records are keyed by tenant with librdkafka's default partitioner (CRC32), so most land on
another partition than the tenant's (murmur2) and are forwarded there; requests are signed
as the README says (scheme v2, and v1 during its migration window). Also: Spring Kafka's
request-reply headers, a keyless record, and tenants trying to get more than their quota by
reusing a request_id or replaying a signed record.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from aiokafka.partitioner import murmur2

from schemas.quota import QuotaCharge
from tests.support.harness import (
    Broker,
    ConsumerProcess,
    TopicSet,
    base_settings,
    ensure_test_topics,
    log_tail,
    merge,
    start_consumer,
)
from tests.support.raw_kafka import TopicReader
from tests.support.rdkafka import RdkafkaRequester, crc32_partition, sign_v1, sign_v2
from tests.support.usage_queries import wait_usage

pytestmark = pytest.mark.integration

PARTITIONS = 12
CHAT_LIMIT = 2
SECRET = "any-client-secret-0123456789"


def tenants_on_foreign_partitions(count: int, prefix: str) -> list[str]:
    """Tenant ids that librdkafka and Java place on different partitions."""
    found = []
    for i in range(1000):
        tenant = f"{prefix}{i}"
        key = tenant.encode()
        if crc32_partition(key, PARTITIONS) != (murmur2(key) & 0x7FFFFFFF) % PARTITIONS:
            found.append(tenant)
        if len(found) == count:
            return found
    raise AssertionError("not enough tenants")


TENANTS = tenants_on_foreign_partitions(12, "stranger-")
KEYS = {t: [{"key_id": f"{t}-k1", "secret": SECRET}] for t in TENANTS}


@dataclass
class Running:
    consumer: ConsumerProcess
    topics: TopicSet
    broker: Broker
    log: Path

    def requester(self, reply_topic: str | None = None) -> RdkafkaRequester:
        requester = RdkafkaRequester(
            self.broker.bootstrap, self.topics.requests, reply_topic or self.topics.replies
        )
        requester.read_from_start(3)
        return requester


def settings_for(broker: Broker, topics: TopicSet, tmp: Path, keys: dict) -> dict:
    return merge(
        base_settings(broker, topics, tmp, auth=True),
        {
            "auth": {"required": True, "keys": keys},
            "quota": {"operation_defaults": {"chat": {"requests": CHAT_LIMIT}}},
        },
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def running(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Running]:
    topics = TopicSet.unique(PARTITIONS)
    await ensure_test_topics(broker, topics)
    tmp = tmp_path_factory.mktemp("any-client")
    log = tmp / "consumer.log"
    # The real model (the packaged SmolLM2): what a stranger's requests really get.
    consumer = ConsumerProcess(
        settings_for(broker, topics, tmp, KEYS), fake_engine=False, log_path=log
    )
    await start_consumer(consumer)
    yield Running(consumer, topics, broker, log)
    consumer.stop()


def signed_request(
    requester: RdkafkaRequester,
    tenant: str,
    body: dict,
    *,
    correlation_id: str | None = None,
    reply_to: str | None = None,
) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    correlation_id = correlation_id or uuid.uuid4().hex
    reply_to = reply_to or requester.reply_topic
    value = json.dumps({"tenant_id": tenant, **body}).encode()
    headers = [
        ("correlation_id", correlation_id.encode()),
        ("reply_to", reply_to.encode()),
        *sign_v2(
            value,
            tenant,
            f"{tenant}-k1",
            SECRET,
            correlation=correlation_id.encode(),
            reply_topic=reply_to,
        ),
    ]
    requester.send(value, key=tenant.encode(), headers=headers)
    return correlation_id, value, headers


OPERATIONS = [
    {
        "operation": "summarize",
        "text": "Kafka stores records. Consumers read them.",
        "max_sentences": 1,
    },
    {"operation": "translate", "text": "Good morning", "target_language": "fr"},
    {"operation": "classify", "text": "I love it", "categories": ["positive", "negative"]},
    {"operation": "chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8},
]


async def test_every_operation_answers_a_librdkafka_producer_on_any_partition(
    running: Running,
) -> None:
    requester = running.requester()
    sent = {}
    for tenant, body in zip(TENANTS[:4], OPERATIONS, strict=True):
        correlation_id, _, _ = signed_request(requester, tenant, body)
        sent[correlation_id.encode()] = body["operation"]
    # The README's v1 scheme still works during its migration window.
    value = json.dumps({"tenant_id": TENANTS[4], **OPERATIONS[0]}).encode()
    requester.send(
        value,
        key=TENANTS[4].encode(),
        headers=[
            ("correlation_id", b"v1-signed"),
            *sign_v1(value, TENANTS[4], f"{TENANTS[4]}-k1", SECRET),
        ],
    )
    sent[b"v1-signed"] = "summarize"
    requester.flush()
    await asyncio.to_thread(requester.collect, set(sent), 60.0)
    await asyncio.to_thread(requester.drain)
    requester.close()
    by_id = {}
    for reply in requester.replies:
        by_id.setdefault(reply.headers.get("correlation_id"), []).append(reply.body)
    assert set(by_id) == set(sent), running.log.read_text()[-3000:]
    for correlation_id, operation in sent.items():
        (body,) = by_id[correlation_id]  # exactly one reply, though the record moved
        assert body["status"] == "ok", body
        assert body["meta"]["operation"] == operation


async def test_a_keyless_record_gets_a_clear_error(running: Running) -> None:
    requester = running.requester()
    value = json.dumps({"tenant_id": TENANTS[5], **OPERATIONS[0]}).encode()
    headers = [
        ("correlation_id", b"keyless-1"),
        *sign_v2(value, TENANTS[5], f"{TENANTS[5]}-k1", SECRET, correlation=b"keyless-1"),
    ]
    requester.send(value, key=None, headers=headers)
    requester.flush()
    await asyncio.to_thread(requester.collect, {b"keyless-1"}, 60.0)
    requester.close()
    (reply,) = [r for r in requester.replies if r.headers.get("correlation_id") == b"keyless-1"]
    assert reply.body["status"] == "error"
    assert reply.body["error"]["code"] == "validation"
    assert "key" in reply.body["error"]["message"]


async def test_spring_replying_template_headers_are_answered_in_kind(running: Running) -> None:
    requester = running.requester()
    tenant = TENANTS[6]
    correlation = uuid.uuid4().bytes  # ReplyingKafkaTemplate: 16 raw bytes
    value = json.dumps({"tenant_id": tenant, **OPERATIONS[2]}).encode()
    headers = [
        ("kafka_replyTopic", running.topics.replies.encode()),
        ("kafka_replyPartition", (2).to_bytes(4, "big")),
        ("kafka_correlationId", correlation),
        *sign_v2(
            value,
            tenant,
            f"{tenant}-k1",
            SECRET,
            correlation=correlation,
            reply_topic=running.topics.replies,
            reply_partition="2",
        ),
    ]
    requester.send(value, key=tenant.encode(), headers=headers)
    requester.flush()
    await asyncio.to_thread(requester.collect, {correlation}, 60.0, "kafka_correlationId")
    requester.close()
    (reply,) = [r for r in requester.replies if r.headers.get("kafka_correlationId") == correlation]
    assert reply.partition == 2
    assert reply.body["status"] == "ok", reply.body


async def test_six_requests_sharing_one_request_id_run_once(running: Running) -> None:
    """Quota escape 1: new bodies and signatures, one request_id (limit 2 chats a day)."""
    requester = running.requester()
    tenant = TENANTS[7]
    ids = []
    for i in range(6):
        body = {
            "operation": "chat",
            "request_id": "shared-id",
            "messages": [{"role": "user", "content": f"question {i}"}],
            "max_tokens": 8,
        }
        correlation_id, _, _ = signed_request(requester, tenant, body)
        ids.append(correlation_id.encode())
        requester.flush()
        await asyncio.sleep(0.3)
    await asyncio.to_thread(requester.collect, set(ids), 60.0)
    requester.close()
    replies = {
        r.headers["correlation_id"]: r.body
        for r in requester.replies
        if r.headers.get("correlation_id") in ids
    }
    assert len(replies) == 6
    statuses = [replies[i]["status"] for i in ids]
    assert statuses.count("ok") == 1 and statuses[0] == "ok", statuses
    for later in ids[1:]:
        error = replies[later]["error"]
        assert error["code"] == "duplicate_request" and error["retryable"] is False
        assert error["original_status"] in ("ok", "in_progress")


async def test_verbatim_replays_of_a_signed_record_do_not_run_again(running: Running) -> None:
    """Quota escape 2: the same bytes and headers produced again inside the skew window get
    the stored reply again (marked replayed), and are neither run nor charged."""
    requester = running.requester()
    tenant = TENANTS[8]
    body = {"operation": "chat", "messages": [{"role": "user", "content": "once"}], "max_tokens": 8}
    correlation_id, value, headers = signed_request(requester, tenant, body)
    requester.flush()
    await asyncio.to_thread(requester.collect, {correlation_id.encode()}, 60.0)
    for _ in range(5):
        requester.send(value, key=tenant.encode(), headers=headers)
        requester.flush()
        await asyncio.sleep(0.3)
    # A replay with the answer sent elsewhere is not run either.
    elsewhere = running.topics.replies + "-elsewhere"
    moved = [(k, elsewhere.encode() if k == "reply_to" else v) for k, v in headers]
    requester.send(value, key=tenant.encode(), headers=moved)
    requester.flush()
    await asyncio.to_thread(requester.drain, 3.0)
    requester.close()
    mine = [
        r.body
        for r in requester.replies
        if r.headers.get("correlation_id") == correlation_id.encode()
    ]
    assert [r["status"] for r in mine] == ["ok"] * 6, mine
    assert "replayed" not in mine[0]["meta"]
    assert all(r["meta"]["replayed"] is True for r in mine[1:]), mine
    assert all(r["result"] == mine[0]["result"] for r in mine), mine
    # The tenant's second chat of the day is still available: nothing was charged twice.
    again = running.requester()
    second, _, _ = signed_request(
        again,
        tenant,
        {"operation": "chat", "messages": [{"role": "user", "content": "twice"}], "max_tokens": 8},
    )
    third, _, _ = signed_request(
        again,
        tenant,
        {"operation": "chat", "messages": [{"role": "user", "content": "thrice"}], "max_tokens": 8},
    )
    again.flush()
    await asyncio.to_thread(again.collect, {second.encode(), third.encode()}, 60.0)
    again.close()
    got = {r.headers.get("correlation_id"): r.body for r in again.replies}
    assert got[second.encode()]["status"] == "ok"
    assert got[third.encode()]["error"]["code"] == "quota_exceeded"


BACKLOG_TENANTS = tenants_on_foreign_partitions(16, "backlog-")[:8] + [
    f"home-{i}" for i in range(8)
]


async def test_a_backlog_published_before_the_consumer_starts_is_answered_in_full(
    broker: Broker, tmp_path: Path
) -> None:
    """96 signed requests of 16 tenants wait on the topic; then one consumer starts (a deploy,
    a restart after an outage). Its partitions' records arrive while their quota state is
    still being restored: every one must be answered, once, and logged once."""
    topics = TopicSet.unique(PARTITIONS)
    await ensure_test_topics(broker, topics)
    keys = {t: [{"key_id": f"{t}-k1", "secret": SECRET}] for t in BACKLOG_TENANTS}
    requester = RdkafkaRequester(broker.bootstrap, topics.requests, topics.replies)
    requester.read_from_start(3)
    sent = []
    for round_ in range(6):
        for tenant in BACKLOG_TENANTS:
            body = {"operation": "classify", "text": f"item {round_}", "categories": ["a", "b"]}
            correlation_id, _, _ = signed_request(requester, tenant, body)
            sent.append(correlation_id.encode())
    requester.flush()
    settings = settings_for(broker, topics, tmp_path, keys)
    consumer = ConsumerProcess(settings, log_path=tmp_path / "consumer.log")
    await start_consumer(consumer)
    try:
        await asyncio.to_thread(requester.collect, set(sent), 120.0)
        await asyncio.to_thread(requester.drain, 2.0)
        answered = [r for r in requester.replies if r.headers.get("correlation_id") in set(sent)]
        assert len({r.headers["correlation_id"] for r in answered}) == len(sent), (
            f"{len(answered)} of {len(sent)} answered"
            + (tmp_path / "consumer.log").read_text()[-3000:]
        )
        assert all(r.body["status"] == "ok" for r in answered)
        assert len(answered) == len(sent)  # no duplicates either
        rows = wait_usage(
            tmp_path / "usage",
            "SELECT count(*), count(DISTINCT request_id) FROM usage",
            lambda rows: rows[0][0] >= len(sent),
            30.0,
        )
        assert rows[0] == (len(sent), len(sent))
    finally:
        requester.close()
        consumer.stop()


async def test_a_redelivery_after_sigkill_is_answered_and_charged_once(
    broker: Broker, tmp_path: Path
) -> None:
    """The one record allowed to run twice under a charged request_id: the same record,
    redelivered after the consumer that charged it died before answering."""
    topics = TopicSet.unique(PARTITIONS)
    await ensure_test_topics(broker, topics)
    tenant = TENANTS[9]
    keys = {tenant: [{"key_id": f"{tenant}-k1", "secret": SECRET}]}
    settings = merge(
        settings_for(broker, topics, tmp_path, keys),
        {"quota": {"operation_defaults": {"chat": {"requests": 1}}}},
    )
    # The fake engine takes 60 s: the first consumer cannot answer before it is killed.
    first = ConsumerProcess(settings, delay_s=60.0, log_path=tmp_path / "first.log")
    await start_consumer(first)
    requester = RdkafkaRequester(broker.bootstrap, topics.requests, topics.replies)
    requester.read_from_start(3)
    body = {
        "operation": "chat",
        "request_id": "once",
        "messages": [{"role": "user", "content": "hi"}],
    }
    correlation_id, _, _ = signed_request(requester, tenant, body)
    requester.flush()
    # The charge is written to the state topic before the request runs: wait for it, then kill.
    async with TopicReader(broker.bootstrap, topics.state) as state:
        charged = await state.until(lambda: charges_of(state, "once") != [], 60.0)
    assert charged, "no charge on the state topic" + log_tail(first.log_path)
    assert [c.settled for c in charges_of(state, "once")] == [False]  # taken, still running
    first.kill()
    # Nothing answered it before the kill, so whatever answers it now had it redelivered.
    async with TopicReader(broker.bootstrap, topics.replies) as replies:
        await replies.read_to_end()
    assert correlation_id not in replies.by_correlation()

    second = ConsumerProcess(settings, delay_s=0.0, log_path=tmp_path / "second.log")
    await start_consumer(second)
    try:
        await asyncio.to_thread(requester.collect, {correlation_id.encode()}, 120.0)
        other, _, _ = signed_request(
            requester, tenant, {**body, "messages": [{"role": "user", "content": "other"}]}
        )
        requester.flush()
        await asyncio.to_thread(requester.collect, {other.encode()}, 60.0)
        got = {r.headers.get("correlation_id"): r.body for r in requester.replies}
        assert got[correlation_id.encode()]["status"] == "ok", got
        # The redelivery was not charged again (limit 1), and the id stays taken.
        assert got[other.encode()]["error"]["code"] == "duplicate_request"
        # The second consumer ran it: one usage row of a run, written by the second instance.
        # (A rebalance as the group settles may hand it the record once more before the
        # commit: that copy is answered from the stored reply, a row marked replayed.)
        rows = wait_usage(
            tmp_path / "usage",
            "SELECT instance_id, status, coalesce(replayed, false) FROM usage_raw "
            "WHERE request_id = 'once' AND status = 'ok'",
            lambda rows: len(rows) >= 1,
            30.0,
        )
        ran = [(instance, status) for instance, status, replayed in rows if not replayed]
        assert ran == [(second.instance_id, "ok")], rows
    finally:
        requester.close()
        second.stop()


def charges_of(state: TopicReader, request_id: str) -> list[QuotaCharge]:
    """The charge records of `request_id` read from the quota state topic so far."""
    charges = [QuotaCharge.model_validate_json(r.value) for r in state.records if r.value]
    return [c for c in charges if c.request_id == request_id]

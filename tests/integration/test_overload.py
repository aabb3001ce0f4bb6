"""Flow control end to end: the real scheduler over a model-free stepped backend, through Kafka.

Work that never ran the model (expired while waiting for it, refused as `overloaded`) leaves
the tenant's quota untouched; a flood with the default flow-control settings is answered
`overloaded` for what the scheduler's queue cannot hold, every request answered with one
outcome, and a revocation under that load drains within the grace (queued work handed over).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumer.quota import partition_for_tenant
from schemas.headers import CORRELATION_ID, REPLY_TO
from schemas.replies import OperationReply
from tests.support.harness import (
    END_MARKER,
    FETCH_MAX_WAIT_MS,
    Broker,
    ConsumerProcess,
    TopicSet,
    append_markers,
    base_settings,
    client_for,
    ensure_test_topics,
    merge,
    start_consumer,
    wait_requests_finished,
)
from tests.support.waiting import wait_until

# Rebalances now and then wedge Tansu (tests/conftest.py): a broker of its own, one rerun.
pytestmark = [pytest.mark.integration, pytest.mark.flaky(reruns=1)]

CHAT = {"operation": "chat", "messages": [{"role": "user", "content": "hello there"}]}
SUMMARY = {"operation": "summarize", "text": "The report shows growth. Costs fell. Staff grew."}


def scheduler_state(consumer: ConsumerProcess) -> dict[str, Any]:
    status, body = consumer.get("/health")
    return (body.get("scheduler") or {}) if status in (200, 503) else {}


async def test_expired_and_overloaded_requests_leave_the_quota_untouched(
    fresh_broker: Broker, tmp_path: Path
) -> None:
    """A tenant with 3 chats a day: its chats that expired waiting for the engine and those
    refused as overloaded count nothing; exactly 3 chats run afterwards, then quota_exceeded."""
    topics = TopicSet.unique(3)
    await ensure_test_topics(fresh_broker, topics)
    settings = merge(
        base_settings(fresh_broker, topics, tmp_path),
        {
            "quota": {"operation_defaults": {"chat": {"requests": 3}}},
            "engine": {"scheduler": {"max_queued": 2}},
        },
    )
    # One slot and two queued; a request takes 25 steps of 50 ms: 1.25 s.
    consumer = ConsumerProcess(settings, stepped=(1, 0.05, 25), log_path=tmp_path / "c.log")
    await start_consumer(consumer)
    codes: list[str | None] = []

    async def send(client: Any, body: dict[str, Any]) -> OperationReply:
        reply = await client.request({"tenant_id": "acme", "request_id": str(uuid.uuid4()), **body})
        if body["operation"] == "chat":
            codes.append(reply.error.code if reply.error else None)
        return reply

    try:
        async with client_for(fresh_broker, topics, timeout_s=60) as client:
            # 1. The slot is busy: a chat that cannot start within its timeout expires
            #    waiting in the queue and is answered so.
            blocker = asyncio.create_task(send(client, SUMMARY))
            await wait_until(lambda: scheduler_state(consumer).get("running") == 1, 20)
            expired = await send(client, {**CHAT, "timeout_ms": 400})
            assert expired.error is not None and expired.error.code == "deadline_exceeded"
            assert (await blocker).status == "ok"

            # 2. Fill the slot and the queue, then chats are refused at once: overloaded,
            #    retryable.
            fill = [asyncio.create_task(send(client, SUMMARY)) for _ in range(12)]
            await wait_until(lambda: sum(f.done() for f in fill) >= 1, 20)  # some refused
            busy = [await send(client, CHAT) for _ in range(2)]
            assert [b.error.code if b.error else None for b in busy] == ["overloaded"] * 2
            assert all(b.error is not None and b.error.retryable for b in busy)
            filled = Counter(
                (r.error.code if r.error else "ok") for r in await asyncio.gather(*fill)
            )
            assert filled["overloaded"] >= 1 and filled["ok"] >= 1, filled

            # 3. None of those counted: the tenant still has all 3 chats of the day.
            for _ in range(4):
                await send(client, {**CHAT, "max_tokens": 4})
        assert codes[-4:] == [None, None, None, "quota_exceeded"], codes
        assert codes.count(None) == 3
    finally:
        consumer.stop()


# ── a flood with the default flow-control settings, and a revocation under it ──

TENANTS = [f"flood-{n}" for n in range(40)]
FLOOD = 160


async def read_replies(bootstrap: str, topic: str) -> list[tuple[bytes, dict[str, Any]]]:
    """Every reply on `topic` as (correlation id, body), read up to fresh end markers."""
    token = uuid.uuid4().hex
    markers = await append_markers(bootstrap, topic, token)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=FETCH_MAX_WAIT_MS
    )
    await consumer.start()
    replies: list[tuple[bytes, dict[str, Any]]] = []
    try:
        parts = [TopicPartition(topic, p) for p in markers]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        left = set(markers)
        while left:
            batches = await asyncio.wait_for(consumer.getmany(timeout_ms=500), 30)
            for tp, records in batches.items():
                for record in records:
                    headers = dict(record.headers or ())
                    if headers.get(END_MARKER) == token.encode():
                        left.discard(tp.partition)
                    elif END_MARKER not in headers and record.value:
                        replies.append((headers.get(CORRELATION_ID, b""), json.loads(record.value)))
    finally:
        await consumer.stop()
    return replies


def revocations(log_path: Path) -> list[dict[str, Any]]:
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "partitions_revoked":
            events.append(event)
    return events


def revoked_summary(tmp_path: Path) -> list[tuple[Any, ...]]:
    return [
        (
            e.get("partitions"),
            e.get("drained"),
            e.get("handed_over"),
            e.get("abandoned"),
            e.get("drain_ms"),
        )
        for e in revocations(tmp_path / "first.log")
    ]


async def test_a_flood_with_defaults_is_answered_overloaded_beyond_what_the_queue_holds(
    fresh_broker: Broker, tmp_path: Path
) -> None:
    """Default intake and scheduler bounds; 4 slots (+ 64 queued), 2.5 s a request. A flood
    of 160 gets `overloaded` for what the queue cannot hold, every request answered with one
    outcome, and a second consumer joining under that load takes partitions whose revocation
    hands queued work over and drains in time (nothing abandoned)."""
    topics = TopicSet.unique(6)
    await ensure_test_topics(fresh_broker, topics)
    settings = merge(
        base_settings(fresh_broker, topics, tmp_path),
        {"kafka": {"session_timeout_ms": 10000, "heartbeat_interval_ms": 1000}},
    )
    stepped = (4, 0.05, 50)
    first = ConsumerProcess(settings, stepped=stepped, log_path=tmp_path / "first.log")
    second = ConsumerProcess(settings, stepped=stepped, log_path=tmp_path / "second.log")
    await start_consumer(first)
    sent: list[bytes] = []
    producer = AIOKafkaProducer(bootstrap_servers=fresh_broker.bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for n in range(FLOOD):
            tenant = TENANTS[n % len(TENANTS)]
            correlation_id = f"flood-{n}".encode()
            body = {**CHAT, "tenant_id": tenant, "request_id": correlation_id.decode()}
            await producer.send(
                topics.requests,
                json.dumps(body).encode(),
                key=tenant.encode(),
                partition=partition_for_tenant(tenant, topics.partitions),
                headers=[(CORRELATION_ID, correlation_id), (REPLY_TO, topics.replies.encode())],
            )
            sent.append(correlation_id)
        await producer.flush()
        # Under load (the engine full, the backlog in Kafka), a second consumer joins.
        await wait_until(lambda: (scheduler_state(first).get("running") or 0) >= 4, 30)
        await start_consumer(second)
        await wait_requests_finished(fresh_broker.bootstrap, topics, timeout_s=120)
    finally:
        await producer.stop()
        second.stop()
        first.stop()

    replies = await read_replies(fresh_broker.bootstrap, topics.replies)
    outcomes: dict[bytes, set[str]] = {}
    for cid, body in replies:
        outcomes.setdefault(cid, set()).add(body["error"]["code"] if body.get("error") else "ok")
    assert set(outcomes) == set(sent)
    # A record answered after one the revocation handed over is delivered again to the new
    # owner (Kafka commits a partition up to its lowest unfinished record): answered alike.
    assert [cid for cid, seen in outcomes.items() if len(seen) != 1] == []
    codes = Counter(next(iter(seen)) for seen in outcomes.values())
    repeats = len(replies) - len(outcomes)
    print(
        f"flood of {FLOOD}: {dict(codes)}, {repeats} repeated replies; "
        f"revocations: {revoked_summary(tmp_path)}"
    )
    assert codes["overloaded"] >= 1 and codes["ok"] >= 1, codes
    assert set(codes) <= {"ok", "overloaded"}, codes
    revoked = revocations(tmp_path / "first.log")
    assert revoked, "the first consumer never gave up partitions"
    assert all(event.get("drained") is True for event in revoked), revoked
    assert all(event.get("abandoned") == 0 for event in revoked), revoked

"""A signed backlog older than the signature window: served, once each; its replays are not.

Signature freshness is measured against each record's own Kafka timestamp (CreateTime, as
librdkafka sets it), not against when a consumer gets to it, so requests that waited out an
outage are answered `ok`. Replays stay refused: the request-id ledger remembers what ran,
even when the replayer forges the record's CreateTime to match the signature.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from aiokafka.partitioner import murmur2

from tests.support.harness import (
    Broker,
    ConsumerProcess,
    TopicSet,
    base_settings,
    ensure_test_topics,
    merge,
    start_consumer,
)
from tests.support.rdkafka import RdkafkaRequester, crc32_partition, sign_v2
from tests.support.usage_queries import wait_usage
from tests.support.waiting import wait_until_blocking

pytestmark = pytest.mark.integration

PARTITIONS = 12
MAX_SKEW_S = 5
SECRET = "signed-backlog-secret-0123456789"
TENANTS = [f"aged-{i}" for i in range(6)]


def forwarded(tenant: str) -> bool:
    """Whether librdkafka's partitioner puts the tenant off its home partition (murmur2)."""
    key = tenant.encode()
    return crc32_partition(key, PARTITIONS) != (murmur2(key) & 0x7FFFFFFF) % PARTITIONS


def signed(
    tenant: str, text: str, reply_topic: str, signed_at: float
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """A classify request signed (scheme v2) as the README says: correlation, value, headers."""
    correlation = uuid.uuid4().hex.encode()
    value = json.dumps(
        {"tenant_id": tenant, "operation": "classify", "text": text, "categories": ["a", "b"]}
    ).encode()
    headers = [
        ("correlation_id", correlation),
        ("reply_to", reply_topic.encode()),
        *sign_v2(
            value,
            tenant,
            f"{tenant}-k1",
            SECRET,
            correlation=correlation,
            reply_topic=reply_topic,
            now=signed_at,
        ),
    ]
    return correlation, value, headers


async def test_a_signed_backlog_older_than_the_window_is_answered_ok_once_and_replays_are_not(
    broker: Broker, tmp_path: Path
) -> None:
    assert any(forwarded(t) for t in TENANTS) and not all(forwarded(t) for t in TENANTS)
    topics = TopicSet.unique(PARTITIONS)
    await ensure_test_topics(broker, topics)
    requester = RdkafkaRequester(broker.bootstrap, topics.requests, topics.replies)
    requester.read_from_start(3)
    sent: dict[bytes, tuple[bytes, list[tuple[str, bytes]], str, int]] = {}
    for round_ in range(2):
        for tenant in TENANTS:
            signed_at = int(time.time())
            correlation, value, headers = signed(
                tenant, f"item {round_}", topics.replies, signed_at
            )
            requester.send(value, key=tenant.encode(), headers=headers)
            sent[correlation] = (value, headers, tenant, signed_at)
    requester.flush()
    # The backlog ages past the window before any consumer exists (the outage itself).
    await asyncio.sleep(2 * MAX_SKEW_S)
    settings = merge(
        base_settings(broker, topics, tmp_path, auth=True),
        {
            "auth": {
                "required": True,
                "max_skew_s": MAX_SKEW_S,
                "keys": {t: [{"key_id": f"{t}-k1", "secret": SECRET}] for t in TENANTS},
            }
        },
    )
    log = tmp_path / "consumer.log"
    consumer = await start_consumer(ConsumerProcess(settings, log_path=log))
    try:
        await asyncio.to_thread(requester.collect, set(sent), 90.0)
        await asyncio.to_thread(requester.drain, 2.0)
        answers = {c: requester.answers(c) for c in sent}
        assert all(len(a) == 1 for a in answers.values()), (answers, log.read_text()[-3000:])
        assert all(a[0]["status"] == "ok" for a in answers.values()), answers
        # Each was served outside the window as the consumer's clock measures it.
        for correlation, (*_, signed_at) in sent.items():
            served = datetime.fromisoformat(answers[correlation][0]["meta"]["timestamp"])
            assert served.timestamp() - signed_at > MAX_SKEW_S

        # Replays of a captured record (a forwarded one: its copy carried the timestamp).
        captured = next(c for c, (_, _, tenant, _) in sent.items() if forwarded(tenant))
        value, headers, tenant, signed_at = sent[captured]
        # As captured, produced now: its CreateTime is far from its signature.
        requester.send(value, key=tenant.encode(), headers=headers)
        # With CreateTime forged to match the signature: the ledger knows the request.
        requester.producer.produce(
            topics.requests,
            value=value,
            key=tenant.encode(),
            headers=headers,
            timestamp=signed_at * 1000,
        )
        requester.flush()

        def both_replays_taken() -> bool:
            requester.poll()
            return len(requester.answers(captured)) >= 3

        await asyncio.to_thread(
            wait_until_blocking, both_replays_taken, 30.0, interval_s=0, what="replays taken"
        )
        await asyncio.to_thread(requester.drain, 2.0)
        replies = requester.answers(captured)
        assert len(replies) == 3, replies
        refused = [r for r in replies if r["status"] == "error"]
        assert len(refused) == 1 and refused[0]["error"]["code"] == "unauthorized", replies
        assert "CreateTime" in refused[0]["error"]["message"]
        # The forged copy gets the stored reply again, marked replayed: the same result.
        served = [r for r in replies if r["status"] == "ok"]
        assert [r["meta"].get("replayed") for r in served] == [None, True], replies
        assert served[0]["result"] == served[1]["result"]
        # Neither replay ran: one usage row per request served, one for the stale refusal,
        # one replay row for the forged copy (no tokens). `usage_raw`: the `usage` view
        # keeps one row per request id (and one per replay).
        rows = wait_usage(
            tmp_path / "usage",
            "SELECT coalesce(error_code, 'ok'), replayed, count(*) FROM usage_raw GROUP BY ALL",
            lambda rows: sum(n for _, _, n in rows) >= len(sent) + 2,
            30.0,
        )
        assert sorted(rows) == sorted(
            [("ok", False, len(sent)), ("unauthorized", False, 1), ("ok", True, 1)]
        ), rows
    finally:
        requester.close()
        consumer.stop()

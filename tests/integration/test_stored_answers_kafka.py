"""Stored answers through Kafka, as a librdkafka requester meets them: after its reply, the
same body under the same request_id with a new correlation id gets the original reply,
marked replayed — also after the consumer was SIGKILLed between the two — charged once,
and the usage log shows one request and its replays."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import (
    Broker,
    ConsumerProcess,
    TopicSet,
    base_settings,
    ensure_test_topics,
    merge,
    start_consumer,
)
from tests.support.rdkafka import RdkafkaRequester, sign_v2
from tests.support.usage_queries import wait_usage

# Kills and restarts a consumer (a group rejoin): a broker of its own, one rerun.
pytestmark = [pytest.mark.integration, pytest.mark.flaky(reruns=1)]

PARTITIONS = 3
SECRET = "stored-answers-secret-0123456789"
TENANT = "acme"
KEYS = {TENANT: [{"key_id": f"{TENANT}-k1", "secret": SECRET}]}
CHAT = {"operation": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


def send_signed(requester: RdkafkaRequester, body: dict[str, Any]) -> bytes:
    """`body` signed (v2) under a fresh correlation id; returns the correlation id."""
    correlation = uuid.uuid4().hex.encode()
    value = json.dumps({"tenant_id": TENANT, **body}).encode()
    headers = [
        ("correlation_id", correlation),
        ("reply_to", requester.reply_topic.encode()),
        *sign_v2(
            value,
            TENANT,
            f"{TENANT}-k1",
            SECRET,
            correlation=correlation,
            reply_topic=requester.reply_topic,
        ),
    ]
    requester.send(value, key=TENANT.encode(), headers=headers)
    requester.flush()
    return correlation


async def ask(requester: RdkafkaRequester, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    correlation = send_signed(requester, body)
    await asyncio.to_thread(requester.collect, {correlation}, 90.0)
    (reply,) = [r for r in requester.replies if r.headers.get("correlation_id") == correlation]
    return reply.body, reply.headers


async def test_a_retry_gets_the_stored_reply_also_after_a_sigkill(
    fresh_broker: Broker, tmp_path: Path
) -> None:
    topics = TopicSet.unique(PARTITIONS)
    await ensure_test_topics(fresh_broker, topics)
    settings = merge(
        base_settings(fresh_broker, topics, tmp_path, auth=True),
        {
            "auth": {"required": True, "keys": KEYS},
            "quota": {"operation_defaults": {"chat": {"requests": 2}}},
        },
    )
    log = tmp_path / "consumer.log"
    consumer = await start_consumer(ConsumerProcess(settings, log_path=log))
    requester = RdkafkaRequester(fresh_broker.bootstrap, topics.requests, topics.replies)
    requester.read_from_start(PARTITIONS)
    try:
        body = {**CHAT, "request_id": "r-1"}
        original, original_headers = await ask(requester, body)
        assert original["status"] == "ok" and "replayed" not in original["meta"]
        assert b"x-opstream-replayed" not in original_headers

        again, again_headers = await ask(requester, body)
        assert again["meta"].pop("replayed") is True
        assert again_headers.get("x-opstream-replayed") == b"true"
        assert again == original  # the same result and meta, counts and all

        consumer.kill()  # SIGKILL between the retries: the answer is in the state topic
        consumer = await start_consumer(ConsumerProcess(settings, log_path=log), 120.0)
        after_kill, _ = await ask(requester, body)
        assert after_kill["meta"].pop("replayed") is True
        assert after_kill == original

        # Charged once: the second chat of the day runs, the third is over the limit.
        second, _ = await ask(requester, {**CHAT, "request_id": "r-2"})
        third, _ = await ask(requester, {**CHAT, "request_id": "r-3"})
        assert second["status"] == "ok"
        assert third["error"]["code"] == "quota_exceeded", third

        rows = wait_usage(
            tmp_path / "usage",
            "SELECT replayed, count(*), sum(output_tokens) FROM usage "
            "WHERE request_id = 'r-1' GROUP BY ALL ORDER BY ALL",
            lambda r: sum(n for _, n, _ in r) >= 3,
            30.0,
        )
        assert rows == [(False, 1, original["meta"]["output_tokens"]), (True, 2, 0)], rows
    finally:
        requester.close()
        consumer.stop()


async def test_a_retry_gets_the_stored_reply_from_the_consumer_that_took_the_partition_over(
    fresh_broker: Broker, tmp_path: Path
) -> None:
    """Answered by consumer A; A leaves the group (its partitions move to B); the retry,
    answered by B, is the original reply replayed, and nothing is charged twice."""
    topics = TopicSet.unique(PARTITIONS)
    await ensure_test_topics(fresh_broker, topics)
    settings = merge(
        base_settings(fresh_broker, topics, tmp_path, auth=True),
        {
            "auth": {"required": True, "keys": KEYS},
            "quota": {"operation_defaults": {"chat": {"requests": 2}}},
        },
    )
    first = await start_consumer(ConsumerProcess(settings, log_path=tmp_path / "a.log"))
    second: ConsumerProcess | None = None
    requester = RdkafkaRequester(fresh_broker.bootstrap, topics.requests, topics.replies)
    requester.read_from_start(PARTITIONS)
    try:
        body = {**CHAT, "request_id": "moved"}
        original, _ = await ask(requester, body)
        assert original["status"] == "ok"
        second = await start_consumer(ConsumerProcess(settings, log_path=tmp_path / "b.log"), 120.0)
        assert first.stop() == 0  # a graceful leave: the group hands everything to B
        retried, headers = await ask(requester, body)
        assert retried["meta"].pop("replayed") is True, retried
        assert headers.get("x-opstream-replayed") == b"true"
        assert retried == original
        assert "request_replayed" in (tmp_path / "b.log").read_text()
        later, _ = await ask(requester, {**CHAT, "request_id": "after"})
        over, _ = await ask(requester, {**CHAT, "request_id": "over"})
        assert later["status"] == "ok" and over["error"]["code"] == "quota_exceeded"
    finally:
        requester.close()
        first.stop()
        if second is not None:
            second.stop()

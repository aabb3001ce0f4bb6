"""Compressed batches from librdkafka producers: every codec Kafka defines is answered.

Java and librdkafka producers commonly set `compression.type`; a batch the consumer cannot
decode would hold its whole partition up. One consumer, on the real model, serves signed
requests that librdkafka producers sent with each of gzip, snappy, lz4 and zstd.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.test_any_client import PARTITIONS, SECRET, settings_for, signed_request
from tests.support.harness import (
    Broker,
    ConsumerProcess,
    TopicSet,
    ensure_test_topics,
    start_consumer,
)
from tests.support.rdkafka import RdkafkaRequester

pytestmark = pytest.mark.integration

CODECS = ("gzip", "snappy", "lz4", "zstd")
PER_CODEC = 2
# Repetitive on purpose: librdkafka sends a batch uncompressed when compressing it would
# not make it smaller, and then the codec would not be exercised.
TEXT = "The update works well and I like the new layout very much. " * 6


async def test_requests_from_producers_with_every_codec_are_answered_ok(
    broker: Broker, tmp_path: Path
) -> None:
    topics = TopicSet.unique(PARTITIONS)
    await ensure_test_topics(broker, topics)
    tenants = {codec: [f"{codec}-tenant-{i}" for i in range(PER_CODEC)] for codec in CODECS}
    keys = {
        tenant: [{"key_id": f"{tenant}-k1", "secret": SECRET}]
        for names in tenants.values()
        for tenant in names
    }
    log = tmp_path / "consumer.log"
    consumer = ConsumerProcess(
        settings_for(broker, topics, tmp_path, keys), fake_engine=False, log_path=log
    )
    await start_consumer(consumer)
    reader = RdkafkaRequester(broker.bootstrap, topics.requests, topics.replies)
    reader.read_from_start(3)
    sent: dict[bytes, str] = {}
    try:
        for codec in CODECS:
            producer = RdkafkaRequester(
                broker.bootstrap,
                topics.requests,
                topics.replies,
                producer_config={"compression.type": codec},
            )
            for tenant in tenants[codec]:
                body = {"operation": "classify", "text": TEXT, "categories": ["good", "bad"]}
                correlation_id, _, _ = signed_request(producer, tenant, body)
                sent[correlation_id.encode()] = codec
            producer.flush()
        await asyncio.to_thread(reader.collect, set(sent), 120.0)
        await asyncio.to_thread(reader.drain)
        answers: dict[bytes, list[dict]] = {}
        for reply in reader.replies:
            answers.setdefault(reply.headers.get("correlation_id", b""), []).append(reply.body)
        unanswered = sorted(
            {codec for correlation, codec in sent.items() if correlation not in answers}
        )
        assert not unanswered, f"no reply to {unanswered}\n{log.read_text()[-3000:]}"
        for correlation, codec in sent.items():
            (body,) = answers[correlation]  # one answer each
            assert body["status"] == "ok", (codec, body)
            assert body["meta"]["operation"] == "classify"
        status, health = consumer.get("/health")
        assert status == 200 and health["unreadable_batches"] == [], health
    finally:
        reader.close()
        consumer.stop()

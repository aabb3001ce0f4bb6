"""Every codec Kafka defines is installed, and a batch that cannot be read is never silent.

The batches here are real Kafka v2 record batches, decoded by aiokafka's own fetcher classes
(`PartitionRecords`, `FetchResult`) against a real `SubscriptionState`: only the network is
left out. A codec "not installed" is aiokafka's own check answering no.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from typing import Any

import aiokafka.codec
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.consumer.fetcher import READ_UNCOMMITTED, FetchResult, PartitionRecords
from aiokafka.consumer.subscription_state import SubscriptionState
from aiokafka.errors import UnsupportedCodecError
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from prometheus_client.parser import text_string_to_metric_families

from consumer.bus.unreadable import UNNAMED_VISIBLE_S, UnreadableBatches, hint_for
from consumer.engine.base import EngineInfo
from consumer.observability.health import HealthReporter
from consumer.observability.telemetry import Telemetry, TelemetrySettings

TOPIC = "ops.requests.v1"
BAD, GOOD = TopicPartition(TOPIC, 3), TopicPartition(TOPIC, 5)
CODECS = {
    "gzip": DefaultRecordBatch.CODEC_GZIP,
    "snappy": DefaultRecordBatch.CODEC_SNAPPY,
    "lz4": DefaultRecordBatch.CODEC_LZ4,
    "zstd": DefaultRecordBatch.CODEC_ZSTD,
}


def batch(codec: int, value: bytes = b'{"operation": "classify"}' * 4) -> bytes:
    """One record batch as a producer writes it (`codec` 0: uncompressed)."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=codec,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    builder.append(0, timestamp=None, key=b"tenant", value=value, headers=[])
    return bytes(builder.build())


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_kafka_defines_is_written_and_read(name: str) -> None:
    data = batch(CODECS[name])
    records = MemoryRecords(data)
    read = records.next_batch()
    assert read.compression_type == CODECS[name]
    (record,) = list(read)
    assert record.value == b'{"operation": "classify"}' * 4


class Consumer:
    """What the guard uses of an AIOKafkaConsumer, over aiokafka's own subscription state,
    with aiokafka's `Fetcher.next_record` loop over fetched partitions (one fetch each)."""

    def __init__(self, fetched: dict[TopicPartition, bytes]) -> None:
        self.subscription = SubscriptionState()
        self.fetched = fetched
        self.rebalance()

    def rebalance(self) -> None:
        """A fresh assignment of the same partitions, each fetched again from offset 0."""
        self.subscription.assign_from_user(set(self.fetched))
        assignment = self.subscription.subscription.assignment
        self.results = {}
        for partition, data in self.fetched.items():
            assignment.state_value(partition).seek(0)
            records = PartitionRecords(
                partition, MemoryRecords(data), None, 0, None, None, True, READ_UNCOMMITTED
            )
            self.results[partition] = FetchResult(
                partition, assignment=assignment, partition_records=records, backoff=0
            )

    def assignment(self) -> set[TopicPartition]:
        return self.subscription.assigned_partitions()

    def paused(self) -> set[TopicPartition]:
        return self.subscription.paused_partitions()

    def pause(self, partition: TopicPartition) -> None:
        self.subscription.pause(partition)

    async def position(self, partition: TopicPartition) -> int:
        return self.subscription.subscription.assignment.state_value(partition).position

    async def getone(self) -> ConsumerRecord | None:
        # As aiokafka's Fetcher.next_record, with another loop variable name: the partition
        # the guard names must come from aiokafka's own frames, not from this fake.
        for partition, result in list(self.results.items()):
            message = result.getone()
            if message is None:
                del self.results[partition]
            else:
                return message
        return None


async def get_msg(consumer: Any) -> ConsumerRecord | None:
    """FastStream's DefaultSubscriber.get_msg."""
    return await consumer.getone()


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    telemetry = Telemetry(TelemetrySettings())
    yield telemetry
    telemetry.shutdown()


def unreadable_counts(telemetry: Telemetry) -> dict[frozenset[tuple[str, str]], float]:
    return {
        frozenset(sample.labels.items()): sample.value
        for family in text_string_to_metric_families(telemetry.prometheus_text().decode())
        for sample in family.samples
        if sample.name == "opstream_unreadable_batches_total"
    }


def health_of(watch: UnreadableBatches) -> dict[str, Any]:
    return HealthReporter(
        started_at=0.0,
        engine_info=lambda: EngineInfo(backend="llamacpp", model="m", loaded=True),
        broker_status=lambda: (True, "connected"),
        assigned_partitions=lambda: {BAD, GOOD},
        unreadable_batches=watch.health_entries,
    ).health()


def corrupt(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF  # inside the records: the CRC no longer matches
    return bytes(flipped)


@pytest.mark.parametrize(
    ("bad_batch", "error", "hint"),
    [
        ("lz4 without its library", "UnsupportedCodecError", "pip install 'aiokafka[lz4]'"),
        ("corrupt", "CorruptRecordException", "corrupt"),
    ],
)
async def test_an_unreadable_batch_pauses_its_partition_and_says_what_to_do(
    bad_batch: str,
    error: str,
    hint: str,
    telemetry: Telemetry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = batch(CODECS["lz4"]) if bad_batch.startswith("lz4") else corrupt(batch(0))
    if bad_batch.startswith("lz4"):
        monkeypatch.setattr(aiokafka.codec, "has_lz4", lambda: False)
    consumer = Consumer({BAD: data, GOOD: batch(0)})
    watch = UnreadableBatches(telemetry.metrics)
    guarded = watch.guard(get_msg)
    assert health_of(watch)["status"] == "healthy"

    with caplog.at_level(logging.ERROR, logger="consumer.bus.unreadable"):
        record = await guarded(consumer)

    # The other partition is served at once; the unreadable one waits, paused, unskipped.
    assert record is not None and record.partition == GOOD.partition
    assert consumer.paused() == {BAD}
    assert await consumer.position(BAD) == 0
    health = health_of(watch)
    assert health["status"] == "degraded"
    (entry,) = health["unreadable_batches"]
    assert entry["partition"] == f"{TOPIC}-3" and entry["offset"] == 0
    assert entry["error"] == error and hint in entry["hint"]
    labels = frozenset({("topic", TOPIC), ("partition", "3"), ("error", error)})
    assert unreadable_counts(telemetry) == {labels: 1}
    (logged,) = [r for r in caplog.records if r.getMessage() == "unreadable_batch"]
    assert logged.__dict__["partition"] == f"{TOPIC}-3"
    assert hint in logged.__dict__["hint"]

    # A rebalance hands the partition out afresh: it is fetched, and reported, again.
    consumer.rebalance()
    assert health_of(watch)["status"] == "healthy"
    record = await guarded(consumer)
    assert record is not None and record.partition == GOOD.partition
    assert health_of(watch)["status"] == "degraded"
    assert unreadable_counts(telemetry) == {labels: 2}


async def test_an_unreadable_batch_on_an_unnamed_partition_is_reported_and_retried(
    telemetry: Telemetry,
) -> None:
    now = [1000.0]
    watch = UnreadableBatches(telemetry.metrics, clock=lambda: now[0])

    async def failing(consumer: Any) -> None:
        raise UnsupportedCodecError("Libraries for zstd compression codec not found")

    with pytest.raises(UnsupportedCodecError):  # FastStream's loop backs off and retries
        await watch.guard(failing)(Consumer({GOOD: batch(0)}))
    (entry,) = health_of(watch)["unreadable_batches"]
    assert entry["partition"] == "unknown partition"
    assert "aiokafka[zstd]" in entry["hint"]
    assert unreadable_counts(telemetry) == {
        frozenset({("topic", "unknown"), ("partition", "unknown"), ("error", entry["error"])}): 1
    }
    now[0] += UNNAMED_VISIBLE_S  # not seen again since: no longer held up
    assert health_of(watch)["status"] == "healthy"


def test_a_codec_kafka_does_not_define_is_the_producers_to_fix() -> None:
    hint = hint_for(UnsupportedCodecError("Unknown compression codec 0x05"))
    assert "does not define" in hint and "reset-offsets" in hint


async def test_the_request_subscriber_fetches_through_the_guard() -> None:
    """FastStream's consume loop calls `self.get_msg(consumer)`: the app wraps exactly that."""
    from faststream.kafka.subscriber.usecase import LogicSubscriber

    from consumer.app import Service, make_broker
    from consumer.settings import Settings

    assert "await self.get_msg(consumer)" in inspect.getsource(LogicSubscriber._run_consume_loop)
    settings = Settings(
        kafka={"bootstrap_servers": "localhost:9"},
        quota={"enabled": False},
        usage={"enabled": False},
    )
    service = Service(settings, engine=None)
    make_broker(settings, service)
    guarded = service._subscriber.get_msg
    assert guarded.__qualname__ == "UnreadableBatches.guard.<locals>.guarded"

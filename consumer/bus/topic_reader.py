"""Reading a compacted topic from the beginning to its current end, without a consumer group."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from consumer.bus.connection import KafkaConnection
from consumer.errors import InfrastructureError


class TopicUnavailable(InfrastructureError):
    """A quota topic is missing or has the wrong shape (run `opstream topics ensure`)."""

    retryable = True


def standalone_consumer(connection: KafkaConnection, *, fetch_max_wait_ms: int) -> AIOKafkaConsumer:
    """A consumer for manual assignment: no group (joins are slow and not needed), no commits."""
    return AIOKafkaConsumer(
        **connection.client_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_max_wait_ms,
    )


async def topic_partitions(
    consumer: AIOKafkaConsumer, topic: str, *, timeout_s: float = 10.0
) -> set[int]:
    """The partition numbers of `topic`; raises TopicUnavailable when it does not exist.

    The one way opstream and its tests learn a topic's partitions, through aiokafka's public
    API only. Whether the topic exists is asked of the brokers (`consumer.topics()`), but
    that answer does not update the consumer's own metadata, which may lack the topic
    (created after the consumer started, or a broker that answers the bootstrap with no
    topics); assigning the topic makes the consumer fetch it. So `consumer` may be left
    assigned to the topic: assign what you read after.
    """
    if topic not in await consumer.topics():
        raise TopicUnavailable(f"topic {topic} does not exist; run `opstream topics ensure`")
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        consumer.assign([TopicPartition(topic, 0)])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not (partitions := consumer.partitions_for_topic(topic)):
            if loop.time() > deadline:
                raise TimeoutError(f"no metadata for topic {topic} within {timeout_s}s")
            await asyncio.sleep(0.01)
    return set(partitions)


async def read_to_end(
    consumer: AIOKafkaConsumer,
    topic: str,
    partitions: set[int],
    *,
    timeout_s: float,
) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
    """Every record of `partitions` from the beginning up to the end offsets seen at the start.

    `consumer` must be started; it is left assigned to `partitions` at their end, so a
    follower can keep reading from there.
    """
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    if not tps:
        return
    ends = await consumer.end_offsets(tps)
    await consumer.seek_to_beginning(*tps)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    # Some brokers (Tansu) report the high watermark as the last batch's base offset + 1;
    # fetches return whole batches, so "position >= end" still means "read everything".
    behind = {tp for tp in tps if ends[tp] > 0}
    while behind:
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError(f"reading {topic} {sorted(partitions)} took over {timeout_s}s")
        batches = await consumer.getmany(*behind, timeout_ms=int(min(left, 0.5) * 1000))
        for records in batches.values():
            for record in records:
                yield record
        for tp in list(behind):
            if await consumer.position(tp) >= ends[tp]:
                behind.discard(tp)

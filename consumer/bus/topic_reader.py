"""Reading a compacted topic from the beginning to its current end, without a consumer group."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from consumer.errors import InfrastructureError


class TopicUnavailable(InfrastructureError):
    """A quota topic is missing or has the wrong shape (run `opstream topics ensure`)."""

    retryable = True


def standalone_consumer(
    bootstrap_servers: str,
    *,
    fetch_max_wait_ms: int,
    client_options: Mapping[str, Any] | None = None,
) -> AIOKafkaConsumer:
    """A consumer for manual assignment: no group (joins are slow and not needed), no commits."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_max_wait_ms,
        **dict(client_options or {}),
    )


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    """The partition numbers of `topic`; raises TopicUnavailable when it does not exist."""
    await consumer.topics()  # forces a metadata refresh
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise TopicUnavailable(f"topic {topic} does not exist; run `opstream topics ensure`")
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

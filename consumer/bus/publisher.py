"""The service's Kafka producer: replies, dead letters (acks=all, awaited)."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaProducer
from aiokafka.errors import TopicAuthorizationFailedError, UnknownTopicOrPartitionError

from consumer.bus.connection import KafkaConnection
from consumer.errors import TopicMissing


class KafkaRecordPublisher:
    """Sends records and returns once the broker acknowledged them."""

    def __init__(
        self, connection: KafkaConnection, client_id: str, *, request_timeout_ms: int = 30_000
    ) -> None:
        self._options = {
            **connection.client_kwargs(),
            "client_id": f"{client_id}-replies",
            "acks": "all",
            "linger_ms": 1,
            "request_timeout_ms": request_timeout_ms,
        }
        self._producer: AIOKafkaProducer | None = None
        self.last_ok_at = 0.0
        self.last_error_at = 0.0
        self.last_error = ""

    @property
    def connected(self) -> tuple[bool, str]:
        """(reachable, detail) judged by the last acknowledged or failed send."""
        if self._producer is None:
            return False, "producer not started"
        if self.last_error_at > self.last_ok_at:
            return False, self.last_error
        return True, "ok"

    async def start(self) -> None:
        # aiokafka binds to the running loop, so the producer is made here, not in __init__.
        self._producer = AIOKafkaProducer(**self._options)
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

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
        """Send to `partition` of `topic` (None, or a partition the topic lacks: the key's).

        Raises `TopicMissing` when the topic does not exist (after the metadata wait) or
        may not be written, any other error when the broker did not acknowledge.
        """
        if self._producer is None:
            raise RuntimeError("publisher not started")
        try:
            try:
                partitions = await self._producer.partitions_for(topic)
            except (UnknownTopicOrPartitionError, TopicAuthorizationFailedError) as exc:
                raise TopicMissing(f"topic {topic[:200]!r}: {type(exc).__name__}") from None
            if partition is not None and partition not in partitions:
                partition = None  # a requester's wrong reply partition must not block us
            await self._producer.send_and_wait(
                topic,
                value,
                key=key,
                headers=headers,
                partition=partition,
                timestamp_ms=timestamp_ms,
            )
        except Exception as exc:
            self.last_error_at = time.monotonic()
            self.last_error = f"send failed: {type(exc).__name__}"
            raise
        self.last_ok_at = time.monotonic()

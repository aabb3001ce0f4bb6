"""A stranger's client: librdkafka (confluent-kafka) with its defaults, signing as the README says.

Nothing here imports the project: records are keyed by tenant with librdkafka's default
partitioner (CRC32, not Java's murmur2), signed with HMAC-SHA256 exactly as the README's
"From any Kafka client" section describes, and replies are read with a plain consumer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from tests.support.waiting import wait_until_blocking


def sign_v2(
    body: bytes,
    tenant_id: str,
    key_id: str,
    secret: str,
    *,
    correlation: bytes,
    reply_topic: str = "",
    reply_partition: str = "",
    now: float | None = None,
) -> list[tuple[str, bytes]]:
    """The README's scheme opstream-hmac-v2, written from the README, not from the code."""
    timestamp = str(int(time.time() if now is None else now))
    message = b"\n".join(
        [
            b"opstream-hmac-v2",
            tenant_id.encode(),
            key_id.encode(),
            timestamp.encode(),
            correlation.hex().encode(),
            reply_topic.encode(),
            reply_partition.encode(),
            body,
        ]
    )
    mac = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return [
        ("x-opstream-key-id", key_id.encode()),
        ("x-opstream-timestamp", timestamp.encode()),
        ("x-opstream-signature", mac.encode()),
        ("x-opstream-signature-version", b"2"),
    ]


def sign_v1(
    body: bytes, tenant_id: str, key_id: str, secret: str, now: float | None = None
) -> list[tuple[str, bytes]]:
    """The README's older scheme opstream-hmac-v1 (body only, no route)."""
    timestamp = str(int(time.time() if now is None else now))
    message = b"\n".join(
        [b"opstream-hmac-v1", tenant_id.encode(), key_id.encode(), timestamp.encode(), body]
    )
    mac = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return [
        ("x-opstream-key-id", key_id.encode()),
        ("x-opstream-timestamp", timestamp.encode()),
        ("x-opstream-signature", mac.encode()),
    ]


def crc32_partition(key: bytes, partitions: int) -> int:
    """Where librdkafka's default partitioner (consistent_random) puts a keyed record."""
    import zlib

    return zlib.crc32(key) % partitions


@dataclass
class Reply:
    partition: int
    headers: dict[str, bytes]
    body: dict[str, Any]


@dataclass
class RdkafkaRequester:
    """Produces requests with librdkafka's defaults and collects the replies of a topic.

    `producer_config` adds librdkafka producer properties (e.g. `compression.type`).
    """

    bootstrap: str
    request_topic: str
    reply_topic: str
    producer_config: dict[str, Any] = field(default_factory=dict)
    producer: Producer = field(init=False)
    replies: list[Reply] = field(default_factory=list)
    _consumer: Consumer | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.producer = Producer({"bootstrap.servers": self.bootstrap, **self.producer_config})

    def send(
        self,
        body: dict[str, Any] | bytes,
        *,
        key: bytes | None,
        headers: Iterable[tuple[str, bytes]] = (),
    ) -> bytes:
        value = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.producer.produce(self.request_topic, value=value, key=key, headers=list(headers))
        return value

    def flush(self, timeout_s: float = 30.0) -> None:
        left = self.producer.flush(timeout_s)
        assert left == 0, f"{left} records not delivered"

    def read_from_start(self, partitions: int) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )
        self._consumer.assign(
            [TopicPartition(self.reply_topic, p, OFFSET_BEGINNING) for p in range(partitions)]
        )

    def collect(
        self, wanted: Iterable[bytes], timeout_s: float, header: str = "correlation_id"
    ) -> list[Reply]:
        """Poll replies until each value in `wanted` of `header` arrived (or time is up)."""
        assert self._consumer is not None, "call read_from_start first"
        consumer, missing = self._consumer, set(wanted)

        def all_arrived() -> bool:
            message = consumer.poll(0.2)
            if message is not None and not message.error():
                self.replies.append(
                    Reply(
                        partition=message.partition(),
                        headers=dict(message.headers() or []),
                        body=json.loads(message.value()),
                    )
                )
            return missing <= self.distinct(header)

        if not missing <= self.distinct(header):
            wait_until_blocking(all_arrived, timeout_s, interval_s=0, raise_on_timeout=False)
        return self.replies

    def poll(self, timeout_s: float = 0.2) -> None:
        """Read at most one more record of the reply topic (streamed chunks included)."""
        assert self._consumer is not None, "call read_from_start first"
        message = self._consumer.poll(timeout_s)
        if message is not None and not message.error():
            self.replies.append(
                Reply(
                    message.partition(), dict(message.headers() or []), json.loads(message.value())
                )
            )

    def distinct(self, header: str = "correlation_id") -> set[bytes]:
        return {r.headers[header] for r in self.replies if header in r.headers}

    def answers(self, correlation: bytes, header: str = "correlation_id") -> list[dict[str, Any]]:
        """Every reply body received for one correlation id, in arrival order."""
        return [r.body for r in self.replies if r.headers.get(header) == correlation]

    def drain(self, quiet_s: float = 1.5) -> None:
        """Keep reading until nothing arrived for `quiet_s` (late or duplicate replies)."""
        assert self._consumer is not None
        last = time.monotonic()
        while time.monotonic() - last < quiet_s:
            message = self._consumer.poll(0.2)
            if message is None or message.error():
                continue
            last = time.monotonic()
            self.replies.append(
                Reply(
                    message.partition(), dict(message.headers() or []), json.loads(message.value())
                )
            )

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()

"""Raw records in and out of the bus: any bytes and headers produced, every record read back.

Replies are read with a plain AIOKafkaConsumer (not `OperationsClient`, which drops
duplicates) so a test can count every reply a correlation id received.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumer.bus.topic_reader import topic_partitions
from schemas.headers import CORRELATION_ID, REPLY_TO
from tests.support.harness import END_MARKER, append_markers
from tests.support.waiting import wait_until

Header = tuple[str, bytes]


def summarize_body(tenant: str, request_id: str, **extra: Any) -> dict[str, Any]:
    """A valid summarize request (the fake engine answers it)."""
    return {
        "operation": "summarize",
        "tenant_id": tenant,
        "request_id": request_id,
        "text": f"Request {request_id} of {tenant}. It has two sentences.",
        **extra,
    }


def request_headers(correlation_id: str, reply_to: str) -> list[Header]:
    return [(CORRELATION_ID, correlation_id.encode()), (REPLY_TO, reply_to.encode())]


def dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def unique_ids(prefix: str, count: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"{prefix}-{tag}-{i:05d}" for i in range(count)]


class RawProducer:
    """An acks=all producer of raw records (any bytes, any headers)."""

    def __init__(self, bootstrap: str) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)

    async def __aenter__(self) -> RawProducer:
        await self._producer.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._producer.stop()

    async def send_many(
        self, topic: str, records: Iterable[tuple[bytes | None, bytes | None, list[Header]]]
    ) -> list[tuple[int, int]]:
        """Send (key, value, headers) records, wait for all acks; their (partition, offset)."""
        futures = [
            await self._producer.send(topic, value, key=key, headers=headers)
            for key, value, headers in records
        ]
        return [(m.partition, m.offset) for m in await asyncio.gather(*futures)]

    async def send_requests(
        self, topic: str, reply_to: str, bodies: Iterable[dict[str, Any]]
    ) -> list[tuple[int, int]]:
        """Send request bodies keyed by tenant, correlation id = request id; their
        (partition, offset)."""
        return await self.send_many(
            topic,
            (
                (
                    str(body["tenant_id"]).encode(),
                    dumps(body),
                    request_headers(str(body["request_id"]), reply_to),
                )
                for body in bodies
            ),
        )


class TopicReader:
    """Reads every partition of a topic from the beginning, without a consumer group."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self._bootstrap = bootstrap
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20
        )
        self.records: list[Any] = []
        self._markers: set[tuple[int, str]] = set()  # (partition, token) of end markers read

    async def __aenter__(self) -> TopicReader:
        await self._consumer.start()
        partitions = await topic_partitions(self._consumer, self.topic)
        assignment = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(assignment)
        await self._consumer.seek_to_beginning(*assignment)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._consumer.stop()

    async def poll(self, timeout_ms: int = 200) -> int:
        """Fetch what is there now; returns how many records arrived (end markers aside)."""
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=5000)
        count = 0
        for records in batches.values():
            for record in records:
                token = header(record, END_MARKER)
                if token is None:
                    self.records.append(record)
                    count += 1
                else:
                    self._markers.add((record.partition, token))
        return count

    async def until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Poll until `done()` holds or `timeout_s` passed; returns `done()`."""

        async def polled() -> bool:
            await self.poll()
            return done()

        return done() or await wait_until(polled, timeout_s, interval_s=0, raise_on_timeout=False)

    async def read_to_end(self, timeout_s: float = 30.0) -> None:
        """Read every record the topic holds now: append an end marker to each partition
        (`append_markers`) and poll until all of them were read back."""
        token = uuid.uuid4().hex
        partitions = await append_markers(self._bootstrap, self.topic, token)
        read_back = await self.until(
            lambda: all((p, token) in self._markers for p in partitions), timeout_s
        )
        assert read_back, f"end markers of {self.topic} not read back within {timeout_s} s"

    def by_correlation(self) -> dict[str, list[dict[str, Any]]]:
        """Decoded replies grouped by their correlation_id header."""
        grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in self.records:
            cid = header(record, CORRELATION_ID)
            if cid is not None:
                grouped[cid].append(json.loads(record.value))
        return grouped


def header(record: Any, name: str) -> str | None:
    """The last value of header `name` on a consumed record, decoded (None: absent)."""
    for key, value in reversed(record.headers or ()):
        if key == name:
            return value.decode("utf-8", "replace") if value is not None else None
    return None

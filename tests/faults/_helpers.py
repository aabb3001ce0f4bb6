"""Shared pieces of the fault tests: raw producing, raw reply/DLQ reading, usage queries.

Replies are read with a plain AIOKafkaConsumer (not `OperationsClient`, which drops
duplicates) so a test can count every reply a correlation id received.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import duckdb
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.headers import CORRELATION_ID, REPLY_TO
from tests.support.harness import (
    END_MARKER,
    Broker,
    ConsumerProcess,
    TopicSet,
    append_markers,
    probe_partitions,
)
from tests.support.waiting import wait_until, wait_until_blocking

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
        partitions = self._consumer.partitions_for_topic(self.topic)
        if not partitions:
            await self._consumer._client.force_metadata_update()
            partitions = self._consumer.partitions_for_topic(self.topic) or set()
        assert partitions, f"topic {self.topic} has no partitions"
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
    for key, value in reversed(record.headers or ()):
        if key == name:
            return value.decode("utf-8", "replace") if value is not None else None
    return None


def query_usage(
    usage_dir: Path, sql: str, params: list[Any] | None = None
) -> list[tuple[Any, ...]]:
    """Run `sql` against the analysts' catalog, opened read-only like an analyst would."""
    conn = duckdb.connect(str(usage_dir / "usage.duckdb"), read_only=True)
    try:
        return conn.execute(sql, params or []).fetchall()
    finally:
        conn.close()


def wait_usage(
    usage_dir: Path, sql: str, done: Callable[[list[tuple[Any, ...]]], bool], timeout_s: float
) -> list[tuple[Any, ...]]:
    """Re-run `sql` until `done(rows)` (rows are flushed in batches, a little later); the
    last rows, done or not."""
    last: list[list[tuple[Any, ...]]] = [[]]

    def finished() -> bool:
        last[0] = query_usage(usage_dir, sql)
        return done(last[0])

    wait_until_blocking(finished, timeout_s, interval_s=0.2, raise_on_timeout=False)
    return last[0]


def log_tail(path: Path, chars: int = 4000) -> str:
    if not path.exists():
        return ""
    return path.read_text(errors="replace")[-chars:]


def unique_ids(prefix: str, count: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"{prefix}-{tag}-{i:05d}" for i in range(count)]


def admin_get(process: ConsumerProcess, path: str, admin_key: str) -> tuple[int, Any]:
    """GET an admin route of a consumer with its admin key."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{process.port}{path}", headers={"X-Admin-Key": admin_key}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


# Tansu joins and rebalances a group in 5-40 s; a dead member is noticed after the session
# timeout. A shorter one (with heartbeats to match) keeps the fault tests quick.
FAST_GROUP = {"kafka": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}}


async def broker_diagnosis(broker: Broker, topics: TopicSet, consumer: ConsumerProcess) -> str:
    """What to print when replies stop coming: the consumer's own view, and whether the
    broker still serves each partition of the request, reply and quota-state topics."""
    try:
        status, body = await asyncio.to_thread(consumer.get, "/ready", 2.0)
        view = f"\n--- consumer /ready: {status} {json.dumps(body)[:600]}"
    except OSError as exc:
        view = f"\n--- consumer /ready: {type(exc).__name__}"
    probes = [await probe_partitions(broker.bootstrap, t) for t in (topics.replies, topics.state)]
    return view + "".join(probes)

"""Shared pieces of the fault tests: raw producing, raw reply/DLQ reading, usage queries.

Replies are read with a plain AIOKafkaConsumer (not `OperationsClient`, which drops
duplicates) so a test can count every reply a correlation id received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import duckdb
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumer.bus.records import CORRELATION_ID, REPLY_TO
from tests.support.harness import Broker, ConsumerProcess, TopicSet, probe_partitions

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
    ) -> None:
        """Send request bodies keyed by tenant, correlation id = request id."""
        await self.send_many(
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
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20
        )
        self.records: list[Any] = []

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
        """Fetch what is there now; returns how many records arrived."""
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=5000)
        count = 0
        for records in batches.values():
            self.records.extend(records)
            count += len(records)
        return count

    async def until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Poll until `done()` holds or `timeout_s` passed; returns `done()`."""
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            await self.poll()
        return done()

    async def settle(self, quiet_s: float = 1.0, timeout_s: float = 10.0) -> None:
        """Keep reading until nothing new arrived for `quiet_s` (late duplicates)."""
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet_s:
            if await self.poll():
                quiet_since = time.monotonic()

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
    """Re-run `sql` until `done(rows)` (rows are flushed in batches, a little later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = query_usage(usage_dir, sql)
        if done(rows) or time.monotonic() >= deadline:
            return rows
        time.sleep(0.2)


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


async def start_consumer(process: ConsumerProcess, timeout_s: float = 90.0) -> ConsumerProcess:
    """Start a consumer process and wait (off the event loop) until it is ready."""
    process.start()
    try:
        await asyncio.to_thread(process.wait_ready, timeout_s)
    except BaseException:
        with contextlib.suppress(Exception):
            process.kill()
        raise
    return process


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


async def group_committed(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """The group's committed offset of each partition of `topic` (None: nothing committed).

    (Tansu's ListOffsets does not report the end of a partition written in multi-record
    batches correctly, so tests compare against the offsets their producer was given.)
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()  # not subscribed: it never joins the group, only reads offsets
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in sorted(partitions)}
    finally:
        await consumer.stop()


async def wait_committed(
    bootstrap: str, group: str, topic: str, ends: dict[int, int], timeout_s: float
) -> dict[int, tuple[int | None, int]]:
    """Wait until the group committed up to `ends` (partition -> next offset); returns the
    partitions still behind as (committed, wanted), empty when none is."""
    deadline = time.monotonic() + timeout_s
    while True:
        committed = await group_committed(bootstrap, group, topic)
        behind = {
            p: (committed.get(p), end) for p, end in ends.items() if (committed.get(p) or 0) < end
        }
        if not behind or time.monotonic() >= deadline:
            return behind
        await asyncio.sleep(0.5)


def ends_of(positions: Iterable[tuple[int, int]]) -> dict[int, int]:
    """partition -> one past the highest offset among (partition, offset) positions."""
    ends: dict[int, int] = {}
    for partition, offset in positions:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    return ends


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

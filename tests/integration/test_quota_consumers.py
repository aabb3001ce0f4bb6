"""Daily quotas end to end: real broker, real consumer processes (fake engine), many producers.

The consumers are started once per module and reused; each test uses its own tenants. Tests
that need a different set of consumers (after a SIGKILL, a restart, a clock past midnight)
ask `Cluster.ensure` for it, which restarts processes only when the running set differs.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.bus.connection import KafkaConnection
from consumer.bus.topic_reader import topic_partitions
from consumer.quota import LimitCommandPublisher, make_state_producer, partition_for_tenant
from opstream_client import OperationsClient
from schemas.headers import CORRELATION_ID
from schemas.replies import OperationReply
from tests.support.harness import (
    END_MARKER,
    FETCH_MAX_WAIT_MS,
    REPO,
    Broker,
    ConsumerProcess,
    TopicSet,
    append_markers,
    base_settings,
    ensure_test_topics,
    env_of,
    merge,
    wait_requests_finished,
)
from tests.support.waiting import wait_until, wait_until_blocking

# A broker of its own, and one rerun on a fresh one when Tansu wedges (tests/conftest.py).
pytestmark = [pytest.mark.integration, pytest.mark.flaky(reruns=1)]

LIMIT = 10  # quota.default_daily_requests: requests per tenant, per operation, per day
KEY = "quota-admin-key"
DELAY_S = 0.05  # fake engine seconds per call, so that granted requests overlap
PRODUCERS = 3
TEXT = "The quarterly report shows steady growth in every region."


# ── consumers ──


class Cluster:
    """The module's consumer processes: one group, one set of topics."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs = 0
        self.broker: Broker | None = None
        self.topics = TopicSet.unique()
        self.settings: dict[str, Any] = {}
        self.consumers: list[ConsumerProcess] = []
        self.clock_offset_s = 0.0

    async def open(self) -> None:
        """A fresh broker and topics, and no consumers (again before a rerun)."""
        self.kill_all()
        if self.broker is not None:
            self.broker.stop()
        self.runs += 1
        self.broker = Broker.start()
        self.topics = TopicSet.unique()
        await ensure_test_topics(self.broker, self.topics)
        self.settings = merge(
            base_settings(self.broker, self.topics, self.root / f"run{self.runs}"),
            {
                "kafka": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
                "quota": {"default_daily_requests": LIMIT, "admin_key": KEY},
            },
        )

    def close(self) -> None:
        self.kill_all()
        if self.broker is not None:
            self.broker.stop()

    @property
    def bootstrap(self) -> str:
        assert self.broker is not None, "cluster not opened"
        return self.broker.bootstrap

    def alive(self) -> list[ConsumerProcess]:
        return [c for c in self.consumers if c.process and c.process.poll() is None]

    def ensure(self, count: int, clock_offset_s: float = 0.0) -> list[ConsumerProcess]:
        """`count` running consumers with this clock offset, sharing the partitions."""
        if len(self.alive()) != count or self.clock_offset_s != clock_offset_s:
            self.stop_all()
            settings = merge(self.settings, {"quota": {"clock_offset_s": clock_offset_s}})
            self.clock_offset_s = clock_offset_s
            for _ in range(count):
                consumer = ConsumerProcess(settings, fake_engine=True, delay_s=DELAY_S)
                consumer.log_path = self.root / f"run{self.runs}-{consumer.instance_id}.log"
                self.consumers.append(consumer.start())
        self.wait_balanced()
        return self.alive()

    def owned_partitions(self) -> dict[str, set[int]] | None:
        """Each live consumer's request partitions (None while one of them is not ready)."""
        owned: dict[str, set[int]] = {}
        for consumer in self.alive():
            try:
                status, body = consumer.get("/ready", timeout_s=1.0)
            except OSError:
                return None
            if status != 200:
                return None
            owned[consumer.instance_id] = {
                int(name.rsplit("-", 1)[1])
                for name in body.get("assigned_partitions", [])
                if name.rsplit("-", 1)[0] == self.topics.requests
            }
        return owned

    def wait_balanced(self, timeout_s: float = 120.0) -> dict[str, set[int]]:
        """Wait until every live consumer is ready and together they own each partition once."""
        last: list[dict[str, set[int]] | None] = [None]

        def balanced() -> dict[str, set[int]] | None:
            owned = last[0] = self.owned_partitions()
            if not owned or not all(owned.values()):
                return None
            counts = Counter(p for parts in owned.values() for p in parts)
            once_each = set(counts) == set(range(self.topics.partitions)) and all(
                n == 1 for n in counts.values()
            )
            return owned if once_each else None

        owned = wait_until_blocking(balanced, timeout_s, interval_s=0.2, raise_on_timeout=False)
        if owned is None:
            tails = "".join(c._tail() for c in self.consumers[-3:])
            raise TimeoutError(f"group not balanced within {timeout_s} s: {last[0]}{tails}")
        return owned

    def stop_all(self) -> None:
        """A rolling stop: each consumer leaves a settled group.

        Tansu (the test broker) can wedge a group for good when its last members leave
        while a rebalance is still pending (measured: a consumer started afterwards was
        never assigned a partition), so the survivors settle before the next one stops.
        """
        while running := self.alive():
            running[0].stop()
            if len(running) > 1:
                self.wait_balanced()
        self.consumers = []

    def kill_all(self) -> None:
        for consumer in self.alive():
            consumer.kill()
        self.consumers = []


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    """The module's consumers, on a broker of their own (see `fresh_on_rerun`)."""
    started = Cluster(tmp_path_factory.mktemp("quota-consumers"))
    await started.open()
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(autouse=True)
async def fresh_on_rerun(request: pytest.FixtureRequest, cluster: Cluster) -> Cluster:
    """A rerun (tests/conftest.py explains why there is one) starts from a fresh
    broker: a wedged Tansu stays wedged. Each test uses its own tenants, so none depends
    on what an earlier test left behind."""
    if getattr(request.node, "execution_count", 1) > 1:
        await cluster.open()
    return cluster


# ── producers and replies ──


def tenant_on(partitions: Iterable[int], count: int, total: int, tag: str = "") -> list[str]:
    """`count` fresh tenants whose requests land on the given partitions, one per partition."""
    wanted, found = set(partitions), dict[int, str]()
    prefix = f"tenant-{tag}{uuid.uuid4().hex[:6]}"
    n = 0
    while len(found) < count:
        name = f"{prefix}-{n}"
        home = partition_for_tenant(name, total)
        if home in wanted and home not in found:
            found[home] = name
        n += 1
    return list(found.values())


@pytest.fixture
async def clients(fresh_on_rerun: Cluster) -> AsyncIterator[list[OperationsClient]]:
    """Several producers, each its own Kafka client."""
    cluster = fresh_on_rerun
    started = [
        OperationsClient(
            cluster.bootstrap,
            request_topic=cluster.topics.requests,
            reply_topic=cluster.topics.replies,
            timeout_s=30.0,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        for _ in range(PRODUCERS)
    ]
    await asyncio.gather(*(c.start() for c in started))
    try:
        yield started
    finally:
        await asyncio.gather(*(c.close() for c in started))


class ReplyTap:
    """Every record on the reply topic, duplicates included (the client keeps only the first)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        self.bootstrap = bootstrap
        self.topic = topic
        self.replies: dict[str, list[OperationReply]] = defaultdict(list)
        self.markers: set[tuple[int, bytes]] = set()  # (partition, token) of end markers read
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ReplyTap:
        await self.consumer.start()
        partitions = await topic_partitions(self.consumer, self.topic)
        assignment = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self.consumer.assign(assignment)
        await self.consumer.seek_to_end(*assignment)
        for tp in assignment:
            await self.consumer.position(tp)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    headers = dict(record.headers or ())
                    if END_MARKER in headers:
                        self.markers.add((record.partition, headers[END_MARKER]))
                        continue
                    correlation_id = headers.get(CORRELATION_ID, b"").decode()
                    reply = OperationReply.model_validate_json(record.value)
                    self.replies[correlation_id].append(reply)

    async def read_to_end(self, timeout_s: float = 30.0) -> None:
        """Wait until the tap has read every reply the topic holds now (`append_markers`)."""
        token = uuid.uuid4().hex
        partitions = await append_markers(self.bootstrap, self.topic, token)
        await wait_until(
            lambda: all((p, token.encode()) in self.markers for p in partitions),
            timeout_s,
            what=f"end markers of {self.topic} read back",
        )


def summarize(tenant: str, **extra: Any) -> dict[str, Any]:
    body = {"operation": "summarize", "tenant_id": tenant, "text": TEXT, "max_sentences": 1}
    return {**body, **extra}


async def send_all(
    clients: list[OperationsClient], bodies: list[dict[str, Any]], timeout_s: float = 30.0
) -> dict[str, OperationReply]:
    """Send every body at once, spread over the producers; replies by correlation id."""
    ids = [str(uuid.uuid4()) for _ in bodies]
    replies = await asyncio.gather(
        *(
            clients[i % len(clients)].request(body, correlation_id=cid, timeout_s=timeout_s)
            for i, (body, cid) in enumerate(zip(bodies, ids, strict=True))
        )
    )
    return dict(zip(ids, replies, strict=True))


def statuses(replies: Iterable[OperationReply]) -> Counter[str]:
    return Counter(r.status if r.error is None else r.error.code for r in replies)


def next_midnight(now: datetime) -> datetime:
    return datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)


def assert_requests_exhausted(reply: OperationReply, limit: int = LIMIT) -> None:
    assert reply.status == "error" and reply.error is not None, reply
    error = reply.error
    assert error.code == "quota_exceeded", error
    assert (error.limit, error.used, error.remaining) == (limit, limit, 0), error
    assert error.limit_name == "summarize.requests"
    assert error.http_status == 429 and error.retryable is False
    now = datetime.now(UTC)
    assert error.resets_at in {next_midnight(now), next_midnight(now - timedelta(minutes=5))}


def admin_get(consumer: ConsumerProcess, path: str, key: str | None = KEY) -> tuple[int, Any]:
    return consumer.get(path, 5.0, admin_key=key)


def usage_row(
    consumer: ConsumerProcess, tenant: str, operation: str = "summarize"
) -> dict[str, Any]:
    status, body = admin_get(consumer, f"/limits/usage?tenant_id={tenant}")
    assert status == 200, body
    return next(r for r in body["usage"] if r["operation"] == operation)


def wait_limit(
    consumers: list[ConsumerProcess], tenant: str, field: str, value: int, timeout_s: float = 15.0
) -> float:
    """Poll GET /limits on every consumer until `field` of (tenant, summarize) is `value`;
    returns how long that took."""

    def applied(consumer: ConsumerProcess) -> bool:
        status, body = admin_get(consumer, f"/limits?tenant_id={tenant}")
        assert status == 200, body
        return next(r for r in body["limits"] if r["operation"] == "summarize")[field] == value

    started = time.monotonic()
    for consumer in consumers:
        wait_until_blocking(
            functools.partial(applied, consumer),
            timeout_s - (time.monotonic() - started),
            interval_s=0.1,
            what=f"{field}={value} applied on {consumer.instance_id}",
        )
    return time.monotonic() - started


# ── the tests ──


async def test_concurrent_producers_get_exactly_the_daily_limit(
    cluster: Cluster, clients: list[OperationsClient]
) -> None:
    consumers = cluster.ensure(2)
    owned = cluster.wait_balanced()
    # one tenant on each consumer's partitions
    tenants = [tenant_on(parts, 1, cluster.topics.partitions)[0] for parts in owned.values()]
    bodies = [summarize(t) for _ in range(3 * LIMIT) for t in tenants]

    replies = await send_all(clients, bodies)

    by_tenant: dict[str, list[OperationReply]] = defaultdict(list)
    for body, reply in zip(bodies, replies.values(), strict=True):
        by_tenant[body["tenant_id"]].append(reply)
    for tenant in tenants:
        assert statuses(by_tenant[tenant]) == {"ok": LIMIT, "quota_exceeded": 2 * LIMIT}, tenant
        for reply in by_tenant[tenant]:
            if reply.status != "ok":
                assert_requests_exhausted(reply)

    # GET /limits/usage: any instance reports every tenant's counts
    for consumer in consumers:
        for tenant in tenants:
            row = usage_row(consumer, tenant)
            assert row["request_count"] == LIMIT
            assert (row["daily_limit"], row["remaining"]) == (LIMIT, 0)
            assert row["date"] == datetime.now(UTC).date().isoformat()
            assert row["resets_at"] == next_midnight(datetime.now(UTC)).isoformat().replace(
                "+00:00", "Z"
            )
            assert row["total_tokens"] > 0
    status, _ = admin_get(consumers[0], f"/limits/usage?tenant_id={tenants[0]}", key=None)
    assert status == 401
    status, _ = admin_get(consumers[0], f"/limits/usage?tenant_id={tenants[0]}", key="wrong")
    assert status == 401


async def test_token_limit_rejects_a_request_that_would_overshoot(
    cluster: Cluster, clients: list[OperationsClient]
) -> None:
    consumers = cluster.ensure(2)
    tenant = tenant_on(range(cluster.topics.partitions), 1, cluster.topics.partitions, "tok")[0]
    producer = make_state_producer(KafkaConnection(cluster.bootstrap))
    await producer.start()
    try:
        publisher = LimitCommandPublisher(producer, cluster.topics.control)
        await publisher.set_limits(
            tenant, "summarize", daily_requests=None, daily_tokens=300, issued_by="test"
        )
    finally:
        await producer.stop()
    wait_limit(consumers, tenant, "daily_tokens", 300)

    big = await clients[0].request(summarize(tenant, max_tokens=400))
    assert big.status == "error" and big.error is not None
    assert big.error.code == "quota_exceeded"
    assert big.error.limit_name == "summarize.tokens"
    assert big.error.limit == 300 and big.error.used == 0 and big.error.remaining == 300

    small = await clients[1].request(summarize(tenant, max_tokens=16))
    assert small.status == "ok", small
    row = usage_row(consumers[0], tenant)
    assert row["request_count"] == 1
    assert 0 < row["total_tokens"] < 300
    assert row["daily_tokens"] == 300 and row["tokens_remaining"] == 300 - row["total_tokens"]


async def test_a_limit_set_with_the_cli_applies_to_running_consumers(
    cluster: Cluster, clients: list[OperationsClient]
) -> None:
    consumers = cluster.ensure(2)
    tenant = tenant_on(range(cluster.topics.partitions), 1, cluster.topics.partitions, "cli")[0]
    first = await clients[0].request(summarize(tenant))
    assert first.status == "ok"

    env = {**os.environ, **env_of(cluster.topics.settings()), "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "consumer.cli.main", "limits", "set",
         "--bootstrap-servers", cluster.bootstrap, "--tenant", tenant,
         "--operation", "summarize", "--daily-requests", "2"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    cli_s = time.monotonic() - started
    applied_s = wait_limit(consumers, tenant, "daily_limit", 2, timeout_s=10.0)
    print(f"cli took {cli_s:.1f} s; applied on every consumer {applied_s:.1f} s later")

    replies = list((await send_all(clients, [summarize(tenant) for _ in range(4)])).values())
    assert statuses(replies) == {"ok": 1, "quota_exceeded": 3}
    for reply in replies:
        if reply.status != "ok":
            assert_requests_exhausted(reply, limit=2)


async def test_sigkilled_consumer_grants_no_more_than_the_limit(
    cluster: Cluster, clients: list[OperationsClient]
) -> None:
    cluster.ensure(2)
    owned = cluster.wait_balanced()
    victim_id, survivor_id = list(owned)
    victim = next(c for c in cluster.alive() if c.instance_id == victim_id)
    total = cluster.topics.partitions
    victim_tenants = tenant_on(owned[victim_id], 2, total, "v")
    tenants = victim_tenants + tenant_on(owned[survivor_id], 2, total, "s")
    bodies = [summarize(t) for _ in range(3 * LIMIT) for t in tenants]
    ids = [str(uuid.uuid4()) for _ in bodies]
    tenant_of = dict(zip(ids, (b["tenant_id"] for b in bodies), strict=True))

    async with ReplyTap(cluster.bootstrap, cluster.topics.replies) as tap:

        async def produce(k: int) -> list[OperationReply]:
            # each producer paces its share, so the kill lands while requests still arrive
            tasks = []
            for i in range(k, len(bodies), PRODUCERS):
                tasks.append(
                    asyncio.create_task(
                        clients[k].request(bodies[i], correlation_id=ids[i], timeout_s=120)
                    )
                )
                await asyncio.sleep(0.04)
            return list(await asyncio.gather(*tasks))

        producing = asyncio.gather(*(produce(k) for k in range(PRODUCERS)))
        await wait_until(
            lambda: sum(1 for cid in tap.replies if tenant_of.get(cid) in victim_tenants) >= 6,
            30,
            interval_s=0.005,
            what="replies from the victim's partitions",
        )
        victim.kill()
        answered_before_kill = len(tap.replies)
        victims_before_kill = sum(1 for cid in tap.replies if tenant_of.get(cid) in victim_tenants)
        await producing
        # Redelivered requests may be answered again. Once the group has finished every
        # request none is left to answer, and the tap reads the reply topic to its end.
        await wait_requests_finished(cluster.bootstrap, cluster.topics, timeout_s=60)
        await tap.read_to_end()

    assert answered_before_kill < len(ids), "the kill came after every reply"
    repeated = sum(len(rs) - 1 for rs in tap.replies.values())
    print(
        f"kill after {answered_before_kill}/{len(ids)} replies "
        f"({victims_before_kill}/{len(ids) // 2} of the victim's); {repeated} repeated replies"
    )
    for tenant in tenants:
        mine = {cid: tap.replies[cid] for cid in ids if tenant_of[cid] == tenant}
        granted = {cid for cid, rs in mine.items() if any(r.status == "ok" for r in rs)}
        assert len(granted) == LIMIT, (tenant, statuses(r for rs in mine.values() for r in rs))
        for cid, replies in mine.items():
            # a redelivered request may be answered again, and the same way
            assert len({(r.status, r.error.code if r.error else None) for r in replies}) == 1, (
                cid,
                replies,
            )
            if cid not in granted:
                assert_requests_exhausted(replies[0])
    survivor = next(c for c in cluster.alive() if c.instance_id == survivor_id)
    for tenant in tenants:
        assert usage_row(survivor, tenant)["request_count"] == LIMIT


async def test_restarted_consumers_keep_the_counters(
    cluster: Cluster, clients: list[OperationsClient]
) -> None:
    cluster.ensure(len(cluster.alive()) or 1)
    tenant = tenant_on(range(cluster.topics.partitions), 1, cluster.topics.partitions, "r")[0]
    replies = await send_all(clients, [summarize(tenant) for _ in range(LIMIT)])
    assert statuses(replies.values()) == {"ok": LIMIT}

    cluster.stop_all()
    consumers = cluster.ensure(2)

    again = await clients[0].request(summarize(tenant))
    assert_requests_exhausted(again)
    for consumer in consumers:
        assert usage_row(consumer, tenant)["request_count"] == LIMIT


async def test_a_new_day_makes_the_quota_available_again(
    cluster: Cluster, clients: list[OperationsClient]
) -> None:
    cluster.ensure(len(cluster.alive()) or 1)
    tenant = tenant_on(range(cluster.topics.partitions), 1, cluster.topics.partitions, "d")[0]
    replies = await send_all(clients, [summarize(tenant) for _ in range(LIMIT + 1)])
    assert statuses(replies.values()) == {"ok": LIMIT, "quota_exceeded": 1}

    now = datetime.now(UTC)
    offset_s = (next_midnight(now) - now).total_seconds() + 60
    (consumer,) = cluster.ensure(1, clock_offset_s=offset_s)

    tomorrow = await clients[0].request(summarize(tenant))
    assert tomorrow.status == "ok", tomorrow
    row = usage_row(consumer, tenant)
    assert row["date"] == (now.date() + timedelta(days=1)).isoformat()
    assert (row["request_count"], row["remaining"]) == (1, LIMIT - 1)

"""The quota state store and limit commands against a real broker (Tansu unless told otherwise)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer

from consumer.bus.connection import KafkaConnection
from consumer.errors import QuotaExceeded
from consumer.quota import (
    LimitBook,
    LimitCommandPublisher,
    LimitFollower,
    QuotaSettings,
    QuotaStore,
    TopicUnavailable,
    Usage,
    make_state_producer,
    partition_for_tenant,
)
from consumer.quota.limit_book import limit_defaults
from tests.support.harness import FETCH_MAX_WAIT_MS, Broker, create_topic, unique_topic
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

PARTITIONS = 3
NOON = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)


@dataclass
class Env:
    bootstrap: str
    settings: QuotaSettings
    producer: AIOKafkaProducer

    def book(self) -> LimitBook:
        return LimitBook(limit_defaults(self.settings))

    def store(
        self,
        book: LimitBook | None = None,
        clock: Callable[[], datetime] = lambda: NOON,
        expected_partitions: int | None = PARTITIONS,
    ) -> QuotaStore:
        return QuotaStore(
            book=book or self.book(),
            settings=self.settings,
            producer=self.producer,
            connection=KafkaConnection(self.bootstrap),
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            expected_partitions=expected_partitions,
            clock=clock,
        )

    def follower(self, book: LimitBook) -> LimitFollower:
        return LimitFollower(
            book,
            connection=KafkaConnection(self.bootstrap),
            topic=self.settings.control_topic,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )

    def publisher(self) -> LimitCommandPublisher:
        return LimitCommandPublisher(self.producer, self.settings.control_topic)


@pytest_asyncio.fixture
async def env(broker: Broker) -> AsyncIterator[Env]:
    settings = QuotaSettings(
        default_daily_requests=3,
        state_topic=unique_topic("test.quota.state"),
        control_topic=unique_topic("test.control"),
    )
    await create_topic(
        broker.bootstrap,
        settings.state_topic,
        PARTITIONS,
        {"cleanup.policy": "compact,delete", "retention.ms": str(settings.state_retention_ms)},
    )
    await create_topic(broker.bootstrap, settings.control_topic, 1, {"cleanup.policy": "compact"})
    producer = make_state_producer(KafkaConnection(broker.bootstrap))
    await producer.start()
    try:
        yield Env(broker.bootstrap, settings, producer)
    finally:
        await producer.stop()


def tenant_on(partition: int) -> str:
    """A tenant id whose requests land on `partition`."""
    for n in range(10_000):
        if partition_for_tenant(f"tenant-{n}", PARTITIONS) == partition:
            return f"tenant-{n}"
    raise AssertionError("no tenant found")


async def test_restore_after_restart_gives_the_same_counters(env: Env) -> None:
    before = env.store()
    await before.restore({0, 1, 2})
    for partition in range(PARTITIONS):
        tenant = tenant_on(partition)
        first = before.reserve(partition, tenant, "summarize", f"{tenant}-a", 10, 100)
        before.reserve(partition, tenant, "chat", f"{tenant}-b", 5, 50)
        before.settle(first, 10, 42)
        await before.persist(partition)

    after = env.store()  # a new process: nothing in memory
    await after.restore({0, 1, 2})
    for partition in range(PARTITIONS):
        assert after.ledger(partition).charges() == before.ledger(partition).charges()
        assert after.ledger(partition).usage(tenant_on(partition), "*", NOON) == Usage(2, 107)


async def test_redelivered_request_is_not_charged_twice_by_the_new_owner(env: Env) -> None:
    tenant = tenant_on(1)
    old_owner = env.store()
    await old_owner.restore({1})
    old_owner.reserve(1, tenant, "chat", "req-1", 10, 10)
    await old_owner.persist(1)  # then the instance dies before committing the offset

    new_owner = env.store()
    await new_owner.restore({1})
    again = new_owner.reserve(1, tenant, "chat", "req-1", 10, 10)
    assert again.duplicate
    assert new_owner.ledger(1).usage(tenant, "chat", NOON) == Usage(1, 20)
    await new_owner.persist(1)

    third = env.store()
    await third.restore({1})
    assert third.ledger(1).usage(tenant, "chat", NOON) == Usage(1, 20)


async def test_new_owner_enforces_exactly_what_the_old_owner_persisted(env: Env) -> None:
    tenant = tenant_on(2)
    old_owner = env.store()
    await old_owner.restore({2})
    results = await asyncio.gather(
        *(_reserve_and_persist(old_owner, 2, tenant, f"r{i}") for i in range(9)),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 3  # the limit
    assert all(isinstance(r, QuotaExceeded) for r in results if r is not None)
    old_owner.forget({2})  # revoked

    new_owner = env.store()
    await new_owner.restore({2})
    with pytest.raises(QuotaExceeded) as caught:
        new_owner.reserve(2, tenant, "summarize", "r-late", 0, 0)
    assert (caught.value.details["used"], caught.value.details["remaining"]) == (3, 0)
    assert new_owner.reserve(2, tenant, "chat", "r-other-op", 0, 0).duplicate is False


async def _reserve_and_persist(store: QuotaStore, partition: int, tenant: str, rid: str) -> None:
    store.reserve(partition, tenant, "summarize", rid, 1, 1)
    await store.persist(partition)


async def test_a_reservation_never_persisted_is_not_seen_by_the_next_owner(env: Env) -> None:
    tenant = tenant_on(0)
    crashed = env.store()
    await crashed.restore({0})
    crashed.reserve(0, tenant, "summarize", "lost", 0, 0)  # no persist: process killed

    successor = env.store()
    await successor.restore({0})
    assert successor.ledger(0).usage(tenant, "summarize", NOON) == Usage(0, 0)
    assert not successor.reserve(0, tenant, "summarize", "lost", 0, 0).duplicate


async def test_quota_is_available_again_after_midnight_on_a_restored_store(env: Env) -> None:
    tenant = tenant_on(1)
    now = [NOON]
    store = env.store(clock=lambda: now[0])
    await store.restore({1})
    for i in range(3):
        store.reserve(1, tenant, "translate", f"d1-{i}", 0, 0)
    await store.persist(1)
    with pytest.raises(QuotaExceeded):
        store.reserve(1, tenant, "translate", "d1-x", 0, 0)

    now[0] = NOON + timedelta(hours=12)  # 00:00 UTC the next day
    restarted = env.store(clock=lambda: now[0])
    await restarted.restore({1})
    assert not restarted.reserve(1, tenant, "translate", "d2-0", 0, 0).duplicate


async def test_restore_refuses_a_state_topic_that_is_not_co_partitioned(env: Env) -> None:
    store = env.store(expected_partitions=12)
    with pytest.raises(TopicUnavailable, match="co-partitioned"):
        await store.restore({0})


async def test_restore_refuses_a_missing_state_topic(env: Env) -> None:
    settings = env.settings.model_copy(update={"state_topic": unique_topic("missing")})
    store = QuotaStore(
        book=env.book(),
        settings=settings,
        producer=env.producer,
        connection=KafkaConnection(env.bootstrap),
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
    )
    with pytest.raises(TopicUnavailable, match="does not exist"):
        await store.restore({0})


async def test_limit_command_is_applied_by_a_running_follower_within_seconds(env: Env) -> None:
    tenant = tenant_on(0)
    book = env.book()
    follower = env.follower(book)
    await follower.start()
    store = env.store(book)
    await store.restore({0})
    try:
        for i in range(3):
            store.reserve(0, tenant, "classify", f"c{i}", 0, 0)
        with pytest.raises(QuotaExceeded):
            store.reserve(0, tenant, "classify", "c3", 0, 0)

        await env.publisher().set_limits(tenant, "classify", daily_requests=5, daily_tokens=None)
        await wait_until(lambda: book.resolve(tenant, "classify").requests == 5)
        store.reserve(0, tenant, "classify", "c3", 0, 0)

        partition, offset = await env.publisher().reset_usage(tenant, NOON.date())
        await follower.wait_applied(partition, offset, timeout_s=5.0)
        assert store.ledger(0).usage(tenant, "classify", NOON) == Usage(0, 0)

        await env.publisher().set_limits(tenant, "classify", daily_requests=None, daily_tokens=None)
        await wait_until(lambda: book.override(tenant, "classify") is None)
        assert book.resolve(tenant, "classify").requests == 3
    finally:
        await follower.stop()


async def test_a_starting_follower_applies_every_command_already_on_the_topic(env: Env) -> None:
    publisher = env.publisher()
    await publisher.set_limits("acme", "chat", daily_requests=7, daily_tokens="unlimited")
    await publisher.set_limits("acme", "chat", daily_requests=8, daily_tokens=None)
    await publisher.set_limits("*", "*", daily_requests=None, daily_tokens=100_000)
    await publisher.set_limits("gone", "chat", daily_requests=1, daily_tokens=None)
    await publisher.set_limits("gone", "chat", daily_requests=None, daily_tokens=None)
    # the control topic is shared: records that are not quota commands are skipped
    await env.producer.send_and_wait(env.settings.control_topic, b'{"kind": "x"}', key=b"other")
    await env.producer.send_and_wait(
        env.settings.control_topic, b"not json", key=b'["quota.limits"]'
    )

    book = env.book()
    follower = env.follower(book)
    await follower.start()  # returns once caught up
    try:
        assert book.resolve("acme", "chat").requests == 8
        assert book.resolve("acme", "chat").tokens is None  # inherits: "*" sets only the total
        assert book.resolve("acme", "*").tokens == 100_000
        assert book.override("gone", "chat") is None
    finally:
        await follower.stop()


async def test_usage_view_reads_partitions_owned_elsewhere(env: Env) -> None:
    here, there = tenant_on(0), tenant_on(1)
    owner = env.store()
    await owner.restore({1})
    owner.reserve(1, there, "chat", "t1", 3, 4)
    await owner.persist(1)

    viewer = env.store()
    await viewer.restore({0})
    viewer.reserve(0, here, "chat", "h1", 1, 1)  # in memory only
    rows = {(r.tenant_id, r.operation): r for r in await viewer.usage()}
    assert rows[(there, "chat")].used == Usage(1, 7)
    assert rows[(here, "chat")].used == Usage(1, 2)
    assert rows[(there, "*")].cap.requests is None
    only = await viewer.usage(tenant_id=there)
    assert {r.tenant_id for r in only} == {there}
    assert next(r for r in only if r.operation == "chat").used == Usage(1, 7)

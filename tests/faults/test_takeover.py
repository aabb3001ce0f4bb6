"""Two instances share a group; one is SIGKILLed mid-run and the survivor takes over.

The dead member's partitions move to the survivor once the broker notices (session
timeout), and the survivor answers everything the dead one left uncommitted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.harness import (
    FAST_GROUP,
    Broker,
    ConsumerProcess,
    base_settings,
    log_tail,
    merge,
    new_topics,
    start_consumer,
)
from tests.support.raw_kafka import RawProducer, TopicReader, summarize_body, unique_ids
from tests.support.usage_queries import wait_usage
from tests.support.waiting import wait_until

# A broker of its own, and one rerun on a fresh one when Tansu wedges (tests/conftest.py).
pytestmark = pytest.mark.flaky(reruns=1)

REQUESTS = 400
TENANTS = [f"takeover-tenant-{i}" for i in range(24)]


def assigned(process: ConsumerProcess) -> set[str]:
    try:
        _, body = process.get("/ready", timeout_s=2.0)
    except OSError:
        return set()
    return set(body.get("assigned_partitions", ())) if isinstance(body, dict) else set()


async def wait_assignment(
    processes: list[ConsumerProcess], everything: set[str], timeout_s: float
) -> list[set[str]]:
    """Wait until each process owns partitions and together they own `everything`, once."""
    owned: list[set[str]] = []

    async def settled() -> bool:
        owned[:] = [await asyncio.to_thread(assigned, p) for p in processes]
        disjoint = sum(len(o) for o in owned) == len(set().union(*owned))
        return all(owned) and disjoint and set().union(*owned) == everything

    if not await wait_until(settled, timeout_s, interval_s=0.5, raise_on_timeout=False):
        raise AssertionError(f"group never settled: {owned}")
    return owned


async def test_survivor_takes_over_partitions_of_a_killed_instance(
    fresh_broker: Broker, tmp_path: Path
) -> None:
    topics = await new_topics(fresh_broker)
    settings = merge(
        base_settings(fresh_broker, topics, tmp_path),
        merge(FAST_GROUP, {"intake": {"max_in_flight": 32}}),
    )
    everything = {f"{topics.requests}-{p}" for p in range(topics.partitions)}
    survivor_log, victim_log = tmp_path / "survivor.log", tmp_path / "victim.log"
    survivor = await start_consumer(
        ConsumerProcess(settings, delay_s=0.05, log_path=survivor_log, instance_id="survivor")
    )
    victim = await start_consumer(
        ConsumerProcess(settings, delay_s=0.05, log_path=victim_log, instance_id="victim")
    )
    try:
        _, victim_owned = await wait_assignment([survivor, victim], everything, timeout_s=90)
        ids = unique_ids("takeover", REQUESTS)
        bodies = [summarize_body(TENANTS[i % len(TENANTS)], rid) for i, rid in enumerate(ids)]
        async with TopicReader(fresh_broker.bootstrap, topics.replies) as replies:
            async with RawProducer(fresh_broker.bootstrap) as producer:
                await producer.send_requests(topics.requests, topics.replies, bodies)
            await replies.until(lambda: len(replies.by_correlation()) >= 60, timeout_s=60)
            victim.kill()
            answered_at_kill = len(replies.by_correlation())
            assert answered_at_kill < REQUESTS, "the kill did not happen mid-run"

            all_answered = await replies.until(
                lambda: set(ids) <= replies.by_correlation().keys(), timeout_s=120
            )
            grouped = replies.by_correlation()
        missing = sorted(set(ids) - grouped.keys())
        assert all_answered and not missing, (
            f"{len(missing)} requests never answered after the takeover, e.g. {missing[:5]}"
            + log_tail(survivor_log)
        )
        errors = [r["error"] for rs in grouped.values() for r in rs if r["status"] != "ok"]
        assert not errors, (
            f"{len(errors)} error replies, e.g. {errors[:3]}"
            + log_tail(survivor_log)
            + log_tail(victim_log)
        )

        # The survivor now owns every partition, and served some of the victim's ones.
        owned = await asyncio.to_thread(assigned, survivor)
        assert owned == everything, owned
        rows = await asyncio.to_thread(
            wait_usage,
            tmp_path / "usage",
            "SELECT request_id, instance_id, kafka_topic || '-' || kafka_partition FROM usage "
            "WHERE request_id IS NOT NULL",
            lambda found: len(found) >= REQUESTS,
            30.0,
        )
        assert {r[0] for r in rows} == set(ids)
        taken_over = {r[2] for r in rows if r[1] == "survivor"} & victim_owned
        assert taken_over, "the survivor served none of the killed instance's partitions"
        assert survivor.stop() == 0, log_tail(survivor_log)
    finally:
        victim.kill()
        survivor.kill()

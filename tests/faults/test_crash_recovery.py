"""A consumer SIGKILLed with hundreds of requests in flight loses nothing once restarted.

At-least-once intake (DESIGN.md "Guarantees"): offsets are committed only after the reply
was acknowledged and the usage row is durable, so a crash only redelivers. A redelivered
request may be answered twice, but it is logged once (view `usage`) and charged once.
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
    broker_diagnosis,
    ends_of,
    log_tail,
    merge,
    new_topics,
    start_consumer,
    wait_committed,
)
from tests.support.raw_kafka import RawProducer, TopicReader, summarize_body, unique_ids
from tests.support.usage_queries import wait_usage

# A broker of its own, and one rerun on a fresh one when Tansu wedges (tests/conftest.py).
pytestmark = pytest.mark.flaky(reruns=1)

REQUESTS = 300
TENANTS = [f"crash-tenant-{i}" for i in range(6)]
ADMIN_KEY = "crash-test-admin-key"


async def test_sigkill_mid_run_then_restart_loses_nothing_and_charges_once(
    fresh_broker: Broker, tmp_path: Path
) -> None:
    topics = await new_topics(fresh_broker)
    settings = merge(
        base_settings(fresh_broker, topics, tmp_path),
        merge(
            FAST_GROUP,
            {"intake": {"max_in_flight": 64}, "quota": {"admin_key": ADMIN_KEY}},
        ),
    )
    usage_dir = tmp_path / "usage"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = await start_consumer(
        ConsumerProcess(settings, delay_s=0.05, log_path=first_log, instance_id="crash-first")
    )
    second: ConsumerProcess | None = None
    ids = unique_ids("crash", REQUESTS)
    bodies = [summarize_body(TENANTS[i % len(TENANTS)], rid) for i, rid in enumerate(ids)]
    try:
        async with TopicReader(fresh_broker.bootstrap, topics.replies) as replies:
            async with RawProducer(fresh_broker.bootstrap) as producer:
                positions = await producer.send_requests(topics.requests, topics.replies, bodies)

            # Kill once some requests are answered and most are still queued or in flight.
            await replies.until(lambda: len(replies.by_correlation()) >= 40, timeout_s=60)
            first.kill()
            answered_before_kill = len(replies.by_correlation())
            assert 0 < answered_before_kill < REQUESTS, (
                f"{answered_before_kill} of {REQUESTS} answered before the kill: the crash "
                "did not happen mid-run" + log_tail(first_log)
            )

            second = await start_consumer(
                ConsumerProcess(
                    settings, delay_s=0.05, log_path=second_log, instance_id="crash-second"
                ),
                timeout_s=90,
            )
            await replies.until(lambda: set(ids) <= replies.by_correlation().keys(), timeout_s=90)
            # Redelivered requests may be answered twice. Once every request is committed none
            # is left to answer, and reading the reply topic to its end collects every reply.
            behind = await wait_committed(
                fresh_broker.bootstrap, topics.group, topics.requests, ends_of(positions), 30
            )
            await replies.read_to_end()
            grouped = replies.by_correlation()

        missing = sorted(set(ids) - grouped.keys())
        if missing:
            diagnosis = await broker_diagnosis(fresh_broker, topics, second)
            raise AssertionError(
                f"{len(missing)} requests never answered, e.g. {missing[:5]}"
                + diagnosis
                + log_tail(second_log)
            )
        assert not behind, f"(committed, wanted) offsets not caught up: {behind}"
        failed = {cid: r for cid, r in grouped.items() if any(x["status"] != "ok" for x in r)}
        assert not failed, f"error replies after the crash: {list(failed.items())[:3]}"
        duplicates = sum(len(r) - 1 for r in grouped.values())
        print(f"answered before kill: {answered_before_kill}; duplicate replies: {duplicates}")

        # Usage: every request exactly once in `usage`, none missing (rows flush in batches).
        rows = await asyncio.to_thread(
            wait_usage,
            usage_dir,
            "SELECT request_id, count(*), min(status) FROM usage "
            "WHERE request_id IS NOT NULL GROUP BY request_id",
            lambda found: len(found) >= REQUESTS,
            30.0,
        )
        logged = {rid: (count, status) for rid, count, status in rows}
        assert set(logged) == set(ids), (
            f"usage misses {len(set(ids) - set(logged))} requests, "
            f"has {len(set(logged) - set(ids))} unknown ones"
        )
        assert all(count == 1 for count, _ in logged.values())
        assert all(status == "ok" for _, status in logged.values())
        raw = await asyncio.to_thread(
            wait_usage, usage_dir, "SELECT count(*) FROM usage_raw", lambda r: True, 0
        )
        print(f"usage_raw rows: {raw[0][0]} for {REQUESTS} requests")

        # Quota: charged exactly once per request, whatever was redelivered.
        status, body = await asyncio.to_thread(
            second.get, "/limits/usage", 10.0, admin_key=ADMIN_KEY
        )
        assert status == 200, body
        charged = {
            row["tenant_id"]: row["request_count"]
            for row in body["usage"]
            if row["operation"] == "summarize" and row["tenant_id"] in TENANTS
        }
        expected = {t: sum(1 for b in bodies if b["tenant_id"] == t) for t in TENANTS}
        assert charged == expected, f"quota charged {charged}, expected {expected}"

        assert second.stop() == 0, log_tail(second_log)
    finally:
        first.kill()
        if second is not None:
            second.kill()

"""The broker freezes (SIGSTOP; `docker pause` on Kafka) past the session timeout mid-run,
then resumes.

The consumer must survive the outage, report it on /health while it is visible (a send
that the frozen broker never acknowledged), rejoin its group, and answer every request.
The broker is this test's own (`fresh_broker`), so freezing it cannot stall other tests (on
Apache Kafka it is the run's one container: tests run one at a time).
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import (
    Broker,
    ConsumerProcess,
    base_settings,
    log_tail,
    merge,
    new_topics,
    start_consumer,
)
from tests.support.raw_kafka import RawProducer, TopicReader, summarize_body, unique_ids
from tests.support.usage_queries import query_usage, wait_usage

BEFORE, AFTER = 100, 30
SESSION_TIMEOUT_MS = 6000
FREEZE_S = 12.0  # twice the session timeout
# Sends the frozen broker never acknowledges fail after this, which /health reports.
REQUEST_TIMEOUT_MS = 5000


# A broker of its own, and one rerun on a fresh one when Tansu wedges (tests/conftest.py).
pytestmark = pytest.mark.flaky(reruns=1)


class HealthSampler(threading.Thread):
    """Polls GET /health until stopped; keeps (monotonic time, status code, body)."""

    def __init__(self, process: ConsumerProcess) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.samples: list[tuple[float, int | None, Any]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                status, body = self.process.get("/health", timeout_s=2.0)
            except OSError as exc:
                status, body = None, repr(exc)
            self.samples.append((time.monotonic(), status, body))
            self.halt.wait(0.25)


async def test_consumer_survives_broker_freeze_longer_than_session_timeout(
    fresh_broker: Broker, tmp_path: Path
) -> None:
    if not fresh_broker.freezable:
        pytest.skip("KAFKA_BOOTSTRAP_SERVERS names an external broker: it cannot be frozen")
    topics = await new_topics(fresh_broker, partitions=6)
    settings = merge(
        base_settings(fresh_broker, topics, tmp_path),
        {
            "kafka": {
                "session_timeout_ms": SESSION_TIMEOUT_MS,
                "heartbeat_interval_ms": 1000,
                "request_timeout_ms": REQUEST_TIMEOUT_MS,
            },
            "intake": {"max_in_flight": 8},
        },
    )
    log_path = tmp_path / "consumer.log"
    consumer = await start_consumer(
        ConsumerProcess(settings, delay_s=0.5, log_path=log_path, instance_id="outage")
    )
    sampler = HealthSampler(consumer)
    ids = unique_ids("outage", BEFORE + AFTER)
    bodies = [summarize_body(f"outage-tenant-{i % 4}", rid) for i, rid in enumerate(ids)]
    frozen = False
    try:
        status, body = consumer.get("/health")
        assert status == 200 and body["broker"]["connected"], body
        sampler.start()
        async with TopicReader(fresh_broker.bootstrap, topics.replies) as replies:
            async with RawProducer(fresh_broker.bootstrap) as producer:
                await producer.send_requests(topics.requests, topics.replies, bodies[:BEFORE])
            await replies.until(lambda: len(replies.by_correlation()) >= 20, timeout_s=60)

            fresh_broker.freeze()
            frozen = True
            froze_at, froze_wall = time.monotonic(), datetime.now(UTC)
            await asyncio.sleep(FREEZE_S)
            fresh_broker.thaw()
            frozen = False
            resumed_at = time.monotonic()

            assert consumer.process is not None and consumer.process.poll() is None, (
                "consumer died during the outage" + log_tail(log_path)
            )
            async with RawProducer(fresh_broker.bootstrap) as producer:
                await producer.send_requests(topics.requests, topics.replies, bodies[BEFORE:])
            all_answered = await replies.until(
                lambda: set(ids) <= replies.by_correlation().keys(), timeout_s=120
            )
            sampler.halt.set()
            grouped = replies.by_correlation()
        missing = sorted(set(ids) - grouped.keys())
        assert all_answered and not missing, (
            f"{len(missing)} requests never answered after the outage, e.g. {missing[:5]}"
            + log_tail(log_path)
        )
        assert all(r["status"] == "ok" for rs in grouped.values() for r in rs)

        # /health: degraded while sends to the frozen broker time out, connected again after.
        during = [b for t, _, b in sampler.samples if froze_at <= t <= resumed_at + 1.0]
        degraded = [b for b in during if isinstance(b, dict) and not b["broker"]["connected"]]
        # /health learns of an outage from a failed send (README, Status): whether one fails
        # inside the freeze depends on timing, so only its shape is checked when it does.
        assert all(b["status"] == "degraded" for b in degraded), degraded[:3]
        status, body = consumer.get("/health")
        assert status == 200 and body["broker"]["connected"], body
        assert body["status"] == "healthy", body

        rows = await asyncio.to_thread(
            wait_usage,
            tmp_path / "usage",
            "SELECT DISTINCT request_id FROM usage WHERE request_id IS NOT NULL",
            lambda found: len(found) >= len(ids),
            30.0,
        )
        assert {r[0] for r in rows} == set(ids)
        # The outage happened mid-run: requests sent before it finished only after it began.
        [(late,)] = query_usage(
            tmp_path / "usage",
            "SELECT count(*) FROM usage "
            "WHERE request_id IN (SELECT unnest(?)) AND finished_at >= ?",
            [ids[:BEFORE], froze_wall],
        )
        assert late > 0, "every request sent before the outage finished before it"
        assert consumer.stop() == 0, log_tail(log_path)
    finally:
        sampler.halt.set()
        if frozen:
            fresh_broker.thaw()
        consumer.kill()

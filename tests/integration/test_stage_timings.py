"""Where a request's time went, end to end: under a load that waits for engine slots, the
stages in the usage row (and the reply's meta) add up to its total, and the wait for a slot
is the scheduler's own measure, not folded into execution."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import (
    Broker,
    ConsumerProcess,
    TopicSet,
    base_settings,
    client_for,
    ensure_test_topics,
    start_consumer,
)
from tests.support.usage_queries import wait_usage

pytestmark = pytest.mark.integration

# One slot; a request generates 6 tokens at one per 40 ms step: ~240 ms of engine each.
SLOTS, STEP_S, TOKENS = 1, 0.04, 6
REQUESTS = 5
STAGE_COLUMNS = "admission_ms, slot_wait_ms, prefill_ms, generation_ms, total_ms"


async def test_stages_add_up_to_the_total_and_slot_wait_is_the_schedulers(
    broker: Broker, tmp_path: Path
) -> None:
    topics = TopicSet.unique(3)
    await ensure_test_topics(broker, topics)
    settings = base_settings(broker, topics, tmp_path)
    consumer = ConsumerProcess(
        settings, stepped=(SLOTS, STEP_S, TOKENS), log_path=tmp_path / "c.log"
    )
    await start_consumer(consumer)
    try:
        async with client_for(broker, topics, timeout_s=60) as client:
            body: dict[str, Any] = {
                "tenant_id": "acme",
                "operation": "chat",
                "messages": [{"role": "user", "content": "hello there"}],
            }
            sent = time.perf_counter()
            replies = await asyncio.gather(
                *(
                    client.request({**body, "request_id": str(uuid.uuid4())})
                    for _ in range(REQUESTS)
                )
            )
            round_trip_ms = (time.perf_counter() - sent) * 1000
        assert [r.status for r in replies] == ["ok"] * REQUESTS
        rows = wait_usage(
            tmp_path / "usage",
            f"SELECT request_id, {STAGE_COLUMNS}, queue_ms, execution_ms, bus_ms FROM usage",
            lambda r: len(r) >= REQUESTS,
            30.0,
        )
    finally:
        consumer.stop()

    assert len(rows) == REQUESTS
    engine_ms = TOKENS * STEP_S * 1000
    for _, admission, slot_wait, prefill, generation, total, queue, execution, bus in rows:
        stages = admission + slot_wait + prefill + generation
        # The gap is shaping the result and the hop from the scheduler thread: a few ms.
        assert 0 <= total - stages < 10, (admission, slot_wait, prefill, generation, total)
        assert queue == pytest.approx(admission + slot_wait, abs=0.01)
        assert execution == pytest.approx(prefill + generation, abs=0.01)
        assert execution >= 0.8 * engine_ms  # waiting is not counted as running
        # On the bus before the fetch: inside the round trip, beside the total (record
        # timestamps are whole milliseconds, hence the 1 ms).
        assert 0 <= bus <= round_trip_ms - total + 1, (bus, total, round_trip_ms)
    # One slot, five requests at once: the later ones waited about a request's run each.
    waits = sorted(row[2] for row in rows)
    assert waits[-1] >= (REQUESTS - 2) * 0.8 * engine_ms, waits
    assert sum(w > 0.5 * engine_ms for w in waits) >= REQUESTS - 2, waits

    # The reply's meta says the same as the row.
    by_id = {row[0]: row for row in rows}
    for reply in replies:
        row = by_id[reply.meta.request_id]
        assert reply.meta.slot_wait_ms == pytest.approx(row[2], abs=0.001)
        assert reply.meta.total_ms == pytest.approx(row[5], abs=0.001)
        assert reply.meta.queue_ms == pytest.approx(row[6], abs=0.001)

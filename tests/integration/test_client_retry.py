"""OperationsClient retries a request that timed out under the same request_id and body:
the service answers the retry `in_progress` while the original runs, then with the stored
reply — the caller gets the one answer, run and charged once."""

from __future__ import annotations

from pathlib import Path

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


async def test_a_timed_out_request_is_retried_safely_and_gets_the_stored_reply(
    broker: Broker, tmp_path: Path
) -> None:
    topics = TopicSet.unique(3)
    await ensure_test_topics(broker, topics)
    # The engine takes 2.5 s; the client waits 1 s per attempt.
    consumer = ConsumerProcess(
        base_settings(broker, topics, tmp_path), delay_s=2.5, log_path=tmp_path / "c.log"
    )
    await start_consumer(consumer)
    try:
        async with client_for(broker, topics, timeout_s=1.0) as client:
            body = {
                "tenant_id": "acme",
                "operation": "chat",
                "messages": [{"role": "user", "content": "hello"}],
            }
            reply = await client.request(body, retries=5)
            assert reply.status == "ok", reply
            assert reply.meta.replayed is True  # a retry's answer: the stored reply
            with pytest.raises(TimeoutError):
                await client.request(body | {"request_id": "no-retry"}, retries=0)
        rows = wait_usage(
            tmp_path / "usage",
            "SELECT coalesce(replayed, false), coalesce(error_code, 'ok'), count(*) "
            f"FROM usage_raw WHERE request_id = '{reply.meta.request_id}' GROUP BY ALL",
            lambda r: any(replayed for replayed, _, _ in r),
            30.0,
        )
    finally:
        consumer.stop()
    by_kind = {(replayed, code): n for replayed, code, n in rows}
    assert by_kind[(False, "ok")] == 1, rows  # ran once
    assert by_kind[(True, "ok")] >= 1, rows

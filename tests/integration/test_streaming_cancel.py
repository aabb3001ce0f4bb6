"""Streamed replies and cancel over the bus, against a real broker and the real model.

One consumer with a single sequence slot, so a cancelled request visibly hands its slot to the
request queued behind it.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from opstream_client import OperationsClient
from schemas.headers import CHUNK_SEQ, CONTENT_TYPE, CORRELATION_ID, JSON, REPLY_TO
from tests.support.harness import (
    Broker,
    ConsumerProcess,
    TopicSet,
    base_settings,
    merge,
    new_topics,
    serving,
    start_consumer,
)
from tests.support.rdkafka import RdkafkaRequester
from tests.support.waiting import wait_until, wait_until_blocking

pytestmark = pytest.mark.integration

ADMIN_KEY = "streaming-test-admin-key"
LONG = 400  # tokens the cancelled request may generate: far more than it gets to


@dataclass
class Live:
    broker: Broker
    topics: TopicSet
    consumer: ConsumerProcess
    client: OperationsClient
    usage_dir: Path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def live(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Live]:
    tmp = tmp_path_factory.mktemp("streaming")
    topics = await new_topics(broker)
    settings = merge(
        base_settings(broker, topics, tmp),
        {
            "engine": {"backend": "llamacpp", "llamacpp": {"n_ctx": 1024, "slots": 1}},
            "streaming": {"chunk_tokens": 4, "chunk_ms": 1000},
            "quota": {"admin_key": ADMIN_KEY},
        },
    )
    async with serving(broker, topics, settings, tmp / "consumer.log", client_timeout_s=120.0) as (
        consumer,
        client,
    ):
        yield Live(broker, topics, consumer, client, tmp / "usage")


def chat(tenant: str, text: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "operation": "chat",
        "tenant_id": tenant,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        **extra,
    }


async def test_chunks_arrive_in_order_and_concatenate_to_the_final_text(live: Live) -> None:
    stream = live.client.stream(
        chat("stream-tenant", "Write three sentences about the sea.", 48, request_id="s-1")
    )
    chunks = [chunk async for chunk in stream]
    reply = stream.reply
    assert reply is not None and reply.status == "ok", reply
    assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))
    assert len(chunks) >= 2, "48 tokens in chunks of at most 4 come in several records"
    assert all(c.request_id == "s-1" for c in chunks)
    assert "".join(c.delta for c in chunks) == reply.result.message.content  # type: ignore[union-attr]


def test_a_librdkafka_requester_reads_chunks_then_the_reply(live: Live) -> None:
    """A stranger's client: confluent-kafka, default partitioner, headers as the README says."""
    requester = RdkafkaRequester(live.broker.bootstrap, live.topics.requests, live.topics.replies)
    correlation = uuid.uuid4().hex.encode()
    try:
        requester.read_from_start(live.topics.partitions)
        body = chat("rdkafka-stream", "Name five colours.", 32, stream=True)
        requester.send(
            body,
            key=b"rdkafka-stream",
            headers=[
                (CORRELATION_ID, correlation),
                (REPLY_TO, live.topics.replies.encode()),
                (CONTENT_TYPE, JSON.encode()),
            ],
        )
        requester.flush()

        def final_arrived() -> bool:
            requester.poll()
            return any(a.get("status") != "chunk" for a in requester.answers(correlation))

        wait_until_blocking(final_arrived, 120, interval_s=0)
    finally:
        requester.close()
    records = [r for r in requester.replies if r.headers.get(CORRELATION_ID) == correlation]
    *chunks, final = records
    assert final.body["status"] == "ok" and CHUNK_SEQ not in final.headers
    assert [int(c.headers[CHUNK_SEQ]) for c in chunks] == list(range(1, len(chunks) + 1))
    assert [c.body["seq"] for c in chunks] == list(range(1, len(chunks) + 1))
    text = "".join(c.body["delta"] for c in chunks)
    assert text == final.body["result"]["message"]["content"]
    assert {c.partition for c in records} == {final.partition}  # one partition: in order


async def test_cancel_frees_the_slot_for_the_queued_request_and_settles_quota(live: Live) -> None:
    tenant = f"cancel-{uuid.uuid4().hex[:6]}"
    long_body = chat(tenant, "Count from 1 to 1000, one number per line.", LONG, request_id="long")
    long_stream = live.client.stream(long_body)
    arrivals: list[tuple[float, int]] = []  # (time, tokens so far) per chunk

    async def read_long() -> None:
        tokens = 0
        async for _chunk in long_stream:
            tokens += 4
            arrivals.append((time.monotonic(), tokens))

    reading = asyncio.create_task(read_long())
    await wait_until(lambda: len(arrivals) >= 3, 120, what="the long request is generating")
    # Queued behind it (one slot): it can only start once the slot is free.
    queued = asyncio.create_task(live.client.request(chat(f"{tenant}-next", "Say hi.", 8)))
    await asyncio.sleep(0.5)
    cancelled_at = time.monotonic()
    cancel = await live.client.cancel("long", tenant_id=tenant)
    short = await queued
    short_done = time.monotonic()
    await reading

    assert cancel.status == "ok" and cancel.result.cancelled is True  # type: ignore[union-attr]
    reply = long_stream.reply
    assert reply is not None and reply.error is not None, reply
    assert (reply.error.code, reply.error.retryable, reply.error.http_status) == (
        "cancelled",
        False,
        499,
    )
    generated = reply.meta.output_tokens
    assert 0 < generated < LONG
    assert short.status == "ok"
    # The queued request finished before the cancelled one could have: the rest of its
    # budget at the rate it was generating would have taken longer than this.
    (t0, n0), (t1, n1) = arrivals[0], arrivals[-1]
    rate = (n1 - n0) / (t1 - t0)
    assert short_done - cancelled_at < (LONG - generated) / rate

    # Quota and usage count what was generated, not the budget.
    usage = admin_usage(live.consumer.port, tenant)
    assert usage["chat"]["request_count"] == 1
    assert usage["chat"]["total_tokens"] == reply.meta.input_tokens + generated  # not + LONG
    rows = await usage_rows(live.usage_dir, tenant)
    by_status = {(r["status"], r["error_code"]): r for r in rows}
    row = by_status[("error", "cancelled")]
    assert (row["input_tokens"], row["output_tokens"]) == (reply.meta.input_tokens, generated)


async def test_cancel_for_a_finished_request_is_harmless_and_scoped_to_the_tenant(
    live: Live,
) -> None:
    tenant = f"scoped-{uuid.uuid4().hex[:6]}"
    done = await live.client.request(chat(tenant, "Say hi.", 4, request_id="r-done"))
    assert done.status == "ok"
    again = await live.client.cancel("r-done", tenant_id=tenant)
    assert again.status == "ok" and again.result.cancelled is False  # type: ignore[union-attr]
    # Another tenant naming a running request's id cancels nothing.
    running = asyncio.create_task(
        live.client.request(chat(tenant, "Count to 200.", 120, request_id="r-run"))
    )
    await asyncio.sleep(1.0)
    other = await live.client.cancel("r-run", tenant_id=f"other-{tenant}")
    assert other.result.cancelled is False  # type: ignore[union-attr]
    assert (await running).status == "ok"


def admin_usage(port: int, tenant: str) -> dict[str, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/limits/usage?tenant_id={tenant}",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read())
    return {row["operation"]: row for row in body["usage"]}


async def usage_rows(directory: Path, tenant: str) -> list[dict[str, Any]]:
    """The tenant's rows in `usage_raw`, as an analyst would read them."""
    from consumer.settings.usage import UsageSettings
    from consumer.usage.catalog import connect_catalog

    found: list[dict[str, Any]] = []

    def read() -> bool:
        connection = connect_catalog(UsageSettings(directory=directory))
        try:
            cursor = connection.execute("SELECT * FROM usage_raw WHERE tenant_id = ?", [tenant])
            names = [d[0] for d in cursor.description]
            found[:] = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            connection.close()
        return bool(found)

    await wait_until(lambda: asyncio.to_thread(read), 30, interval_s=0.3, what="the usage rows")
    return found


@pytest.mark.flaky(reruns=1)  # kills a consumer mid-rebalance-prone Tansu (see tests/conftest.py)
async def test_a_consumer_killed_mid_stream_streams_again_and_answers_once(
    fresh_broker: Broker, tmp_path: Path
) -> None:
    """A stranger's librdkafka requester; the consumer is SIGKILLed while it streams. The next
    consumer runs the request again from its committed offset: chunks start again at seq 1
    (the same greedy text), dropping seqs already seen leaves the final text, there is one
    final reply, and the tenant is charged once."""
    topics = await new_topics(fresh_broker)
    settings = merge(
        base_settings(fresh_broker, topics, tmp_path),
        {
            "engine": {"backend": "llamacpp", "llamacpp": {"n_ctx": 1024}},
            "streaming": {"chunk_tokens": 2, "chunk_ms": 1000},
            "quota": {"operation_defaults": {"chat": {"requests": 1}}},
        },
    )
    tenant = "killed-mid-stream"
    first = ConsumerProcess(settings, fake_engine=False, log_path=tmp_path / "first.log")
    await start_consumer(first, timeout_s=120.0)
    requester = RdkafkaRequester(fresh_broker.bootstrap, topics.requests, topics.replies)
    correlation = uuid.uuid4().hex.encode()

    def headers(cid: bytes) -> list[tuple[str, bytes]]:
        return [(CORRELATION_ID, cid), (REPLY_TO, topics.replies.encode())]

    def arrived(cid: bytes, *, chunks: int = 0, final: bool = False) -> bool:
        requester.poll()
        answers = requester.answers(cid)
        if final:
            return any(a.get("status") != "chunk" for a in answers)
        return sum(a.get("status") == "chunk" for a in answers) >= chunks

    second = ConsumerProcess(settings, fake_engine=False, log_path=tmp_path / "second.log")
    try:
        requester.read_from_start(topics.partitions)
        body = chat(tenant, "Count from 1 to 100, one number per line.", 160, stream=True)
        requester.send(body, key=tenant.encode(), headers=headers(correlation))
        requester.flush()
        await asyncio.to_thread(
            wait_until_blocking, lambda: arrived(correlation, chunks=3), 120, interval_s=0
        )
        first.kill()
        await start_consumer(second, timeout_s=120.0)
        await asyncio.to_thread(
            wait_until_blocking, lambda: arrived(correlation, final=True), 180, interval_s=0
        )
        # The tenant's limit is one chat a day: the rerun was not a second charge.
        again = uuid.uuid4().hex.encode()
        requester.send(chat(tenant, "Say hi.", 4), key=tenant.encode(), headers=headers(again))
        requester.flush()
        await asyncio.to_thread(
            wait_until_blocking, lambda: arrived(again, final=True), 120, interval_s=0
        )
        await asyncio.to_thread(requester.drain)  # late duplicates, if any
    finally:
        requester.close()
        first.kill()
        second.stop()

    answers = requester.answers(correlation)
    finals = [a for a in answers if a["status"] != "chunk"]
    assert [f["status"] for f in finals] == ["ok"], finals
    chunks = [a for a in answers if a["status"] == "chunk"]
    seen: dict[int, str] = {}
    for chunk in chunks:
        seen.setdefault(chunk["seq"], chunk["delta"])
    assert len(chunks) > len(seen), "the rerun sent its chunks again from seq 1"
    assert sorted(seen) == list(range(1, len(seen) + 1))
    text = "".join(seen[seq] for seq in sorted(seen))
    assert text == finals[0]["result"]["message"]["content"]
    (refused,) = requester.answers(again)
    assert refused["error"]["code"] == "quota_exceeded"

"""Many tenants at once on the real model, the way the held-out checks run it.

Signed requests from librdkafka producers (CRC32 partitioner: most land on a partition that is
not their tenant's and are forwarded), per-tenant quotas, fair-share preemption on, and:
(a) a backlog of 96 classify requests from 16 tenants waiting before the one consumer starts;
(b) 16 tenants' chat and classify requests over two consumers, one SIGKILLed mid-stream and the
survivor taking its partitions over. Every request is answered (a redelivery may repeat an
answer, never change it), no reply is `internal`, and each tenant gets exactly its quota of
`ok` and the rest `quota_exceeded`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_any_client import PARTITIONS, SECRET, settings_for, signed_request
from tests.support.harness import (
    FAST_GROUP,
    Broker,
    ConsumerProcess,
    TopicSet,
    ensure_test_topics,
    log_tail,
    merge,
    start_consumer,
)
from tests.support.rdkafka import RdkafkaRequester

# A broker of its own, and one rerun on a fresh one when Tansu wedges (tests/conftest.py).
pytestmark = [pytest.mark.integration, pytest.mark.flaky(reruns=1)]

TENANTS = [f"load-tenant-{i:02d}" for i in range(16)]
KEYS = {t: [{"key_id": f"{t}-k1", "secret": SECRET}] for t in TENANTS}
LABELS = ["billing", "shipping", "praise", "complaint"]


def classify(i: int) -> dict[str, Any]:
    return {
        "operation": "classify",
        "request_id": f"c-{i}",
        "text": f"Order {i} arrived late and the box was damaged.",
        "categories": LABELS,
    }


def chat(i: int) -> dict[str, Any]:
    return {
        "operation": "chat",
        "request_id": f"m-{i}",
        "messages": [{"role": "user", "content": f"Say something kind about parcel {i}."}],
        "max_tokens": 16,
    }


def outcomes(
    requester: RdkafkaRequester, sent: dict[bytes, str]
) -> tuple[dict[bytes, str], list[str]]:
    """(the one outcome of each correlation id: `ok` or the error code, contradictions)."""
    seen: dict[bytes, set[str]] = defaultdict(set)
    for reply in requester.replies:
        correlation = reply.headers.get("correlation_id")
        if correlation in sent:
            body = reply.body
            seen[correlation].add("ok" if body["status"] == "ok" else body["error"]["code"])
    contradictions = [f"{c!r}: {sorted(s)}" for c, s in seen.items() if len(s) > 1]
    return {c: next(iter(s)) for c, s in seen.items()}, contradictions


# Log events that mean the scheduler and the backend disagreed, or the engine stopped moving.
TROUBLE = (
    "engine_start_failed",
    "engine_start_refused",
    "scheduler_backend_disagree",
    "engine_stalled",
    "engine_step_failed",
    "request_failed",
)


def trouble_in(*logs: Path) -> list[str]:
    return [
        line[:300]
        for log in logs
        for line in log.read_text(errors="replace").splitlines()
        if any(f'"{event}"' in line for event in TROUBLE)
    ]


def per_tenant(sent: dict[bytes, str], got: dict[bytes, str]) -> dict[str, Counter[str]]:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for correlation, outcome in got.items():
        counts[sent[correlation]][outcome] += 1
    return counts


async def test_a_backlog_of_many_tenants_is_served_whole_by_one_consumer(
    fresh_broker: Broker, tmp_path: Path
) -> None:
    per_tenant_requests, limit = 6, 4
    topics = TopicSet.unique(PARTITIONS)
    await ensure_test_topics(fresh_broker, topics)
    settings = merge(
        settings_for(fresh_broker, topics, tmp_path, KEYS),
        {"quota": {"operation_defaults": {"classify": {"requests": limit}}}},
    )
    requester = RdkafkaRequester(fresh_broker.bootstrap, topics.requests, topics.replies)
    sent: dict[bytes, str] = {}
    for i in range(per_tenant_requests * len(TENANTS)):
        tenant = TENANTS[i % len(TENANTS)]
        correlation, _, _ = signed_request(requester, tenant, classify(i))
        sent[correlation.encode()] = tenant
    requester.flush()  # all waiting before the consumer exists (a restart after an outage)
    log = tmp_path / "consumer.log"
    consumer = ConsumerProcess(settings, fake_engine=False, log_path=log)
    await start_consumer(consumer)
    requester.read_from_start(3)
    try:
        await asyncio.to_thread(requester.collect, sent, 300.0)
        requester.drain()
        got, contradictions = outcomes(requester, sent)
        missing = len(sent) - len(got)
        assert missing == 0, f"{missing} of {len(sent)} never answered" + log_tail(log)
        assert not contradictions, contradictions
        internal = [c for c, o in got.items() if o == "internal"]
        assert not internal, f"{len(internal)} answered internal" + log_tail(log)
        expected = {"ok": limit, "quota_exceeded": per_tenant_requests - limit}
        counts = per_tenant(sent, got)
        assert all(counts[t] == expected for t in TENANTS), dict(counts)
        _, health = await asyncio.to_thread(consumer.get, "/health")
        scheduler = health["scheduler"]
        assert scheduler["refused_starts"] == 0 and scheduler["disagreements"] == 0, scheduler
        assert scheduler["stalls"] == 0, scheduler
        assert consumer.stop() == 0, log_tail(log)
        assert trouble_in(log) == []
    finally:
        requester.close()
        consumer.kill()


async def test_two_consumers_under_many_tenants_survive_a_sigkill(
    fresh_broker: Broker, tmp_path: Path
) -> None:
    per_tenant_requests, limit = 6, 4  # each a chat or a classify; limit on requests in all
    topics = TopicSet.unique(PARTITIONS)
    await ensure_test_topics(fresh_broker, topics)
    settings = merge(
        merge(settings_for(fresh_broker, topics, tmp_path, KEYS), FAST_GROUP),
        {
            "quota": {
                "total_daily_requests": limit,
                "operation_defaults": {"chat": {"requests": 100}, "classify": {"requests": 100}},
            }
        },
    )
    logs = [tmp_path / "survivor.log", tmp_path / "victim.log"]
    survivor = ConsumerProcess(settings, fake_engine=False, log_path=logs[0], instance_id="s")
    victim = ConsumerProcess(settings, fake_engine=False, log_path=logs[1], instance_id="v")
    await start_consumer(survivor)
    await start_consumer(victim)
    requester = RdkafkaRequester(fresh_broker.bootstrap, topics.requests, topics.replies)
    requester.read_from_start(3)
    sent: dict[bytes, str] = {}
    try:
        for i in range(per_tenant_requests * len(TENANTS)):
            tenant = TENANTS[i % len(TENANTS)]
            body = chat(i) if i % 2 else classify(i)
            correlation, _, _ = signed_request(requester, tenant, body)
            sent[correlation.encode()] = tenant
        requester.flush()
        deadline = time.monotonic() + 120
        while len(requester.distinct() & sent.keys()) < 20 and time.monotonic() < deadline:
            await asyncio.to_thread(requester.poll, 0.2)
        answered_at_kill = len(requester.distinct() & sent.keys())
        victim.kill()
        assert answered_at_kill < len(sent), "the kill did not happen mid-stream"
        await asyncio.to_thread(requester.collect, sent, 360.0)
        requester.drain()
        got, contradictions = outcomes(requester, sent)
        missing = len(sent) - len(got)
        assert missing == 0, f"{missing} of {len(sent)} never answered" + log_tail(logs[0])
        assert not contradictions, contradictions
        internal = [c for c, o in got.items() if o == "internal"]
        assert not internal, f"{len(internal)} answered internal" + log_tail(logs[0])
        expected = {"ok": limit, "quota_exceeded": per_tenant_requests - limit}
        counts = per_tenant(sent, got)
        assert all(counts[t] == expected for t in TENANTS), dict(counts)
        assert survivor.stop() == 0, log_tail(logs[0])
        assert trouble_in(*logs) == []
    finally:
        requester.close()
        victim.kill()
        survivor.kill()

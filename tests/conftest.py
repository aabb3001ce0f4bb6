"""Fixtures shared by every test directory: one real broker per session, fresh topics per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.harness import Broker, TopicSet, ensure_test_topics


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A real Kafka-protocol broker: Tansu on a free loopback port, or KAFKA_BOOTSTRAP_SERVERS."""
    started = Broker.start()
    yield started
    started.stop()


@pytest.fixture
async def topics(broker: Broker) -> TopicSet:
    """This test's own request/reply/DLQ/quota topics and consumer group, created."""
    created = TopicSet.unique()
    await ensure_test_topics(broker, created)
    return created

"""The test broker: one shared by the session, or a fresh one for a test that may wedge it.

Each test on the shared broker gets topics and a consumer group of its own (`topics`).

Tests that kill, freeze or restart consumers through rebalances (`tests/faults`,
`tests/integration/test_quota_consumers.py`) occasionally wedge Tansu itself — a group that
never assigns again, fetches that never return — which Apache Kafka does not do (README,
"Tests and benchmarks"). So they run on a broker of their own (`fresh_broker`, or
`Broker.start()` for a module's worth of tests; Tansu starts in milliseconds) and carry
`pytest.mark.flaky(reruns=1)`: a failed one runs once more on another fresh broker. A
fault in the consumer fails both runs; pytest reports every rerun (`R` in the progress
line, "rerun" in the summary).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.harness import Broker, TopicSet, new_topics


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A real Kafka-protocol broker: Tansu on a free loopback port, or KAFKA_BOOTSTRAP_SERVERS."""
    with Broker.start() as started:
        yield started


@pytest.fixture
def fresh_broker() -> Iterator[Broker]:
    """A broker of this test's own, started for it and stopped after it (a rerun gets another)."""
    with Broker.start() as started:
        yield started


@pytest.fixture
async def topics(broker: Broker) -> TopicSet:
    """This test's own request/reply/DLQ/quota topics and consumer group, created."""
    return await new_topics(broker)

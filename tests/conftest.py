"""The test broker: one shared by the session, or a fresh one for a test that may wedge it.

Each test on the shared broker gets topics and a consumer group of its own (`topics`).

The broker is Tansu unless OPSTREAM_TEST_BROKER=kafka asks for Apache Kafka in Docker
(testcontainers; README, "Tests and benchmarks"); KAFKA_BOOTSTRAP_SERVERS names a running
one instead.

Tests that kill, freeze or restart consumers through rebalances (`tests/faults`,
`tests/integration/test_quota_consumers.py`) occasionally wedge Tansu itself — a group that
never assigns again, fetches that never return — which Apache Kafka does not do (README,
"Tests and benchmarks"). So they run on a broker of their own (`fresh_broker`, or
`Broker.start()` for a module's worth of tests; Tansu starts in milliseconds) and carry
`pytest.mark.flaky(reruns=1)`: a failed one runs once more on another fresh broker. A
fault in the consumer fails both runs; pytest reports every rerun (`R` in the progress
line, "rerun" in the summary). On Apache Kafka there is nothing to rerun for: every test
shares the run's one container and a failure fails at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.harness import BROKER_KIND, ON_TANSU, Broker, TopicSet, new_topics


def pytest_report_header() -> str:
    return f"test broker: {BROKER_KIND} (OPSTREAM_TEST_BROKER)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if ON_TANSU:
        return
    # The closest `flaky` marker wins: the first of the test's own, put there here.
    for item in items:
        if item.get_closest_marker("flaky") is not None:
            item.add_marker(pytest.mark.flaky(reruns=0), append=False)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A real Kafka-protocol broker: Tansu on a free loopback port, the run's Kafka container,
    or KAFKA_BOOTSTRAP_SERVERS."""
    with Broker.start() as started:
        yield started


@pytest.fixture
def fresh_broker() -> Iterator[Broker]:
    """A broker of this test's own, started for it and stopped after it (a rerun gets another;
    on Apache Kafka, the run's one container)."""
    with Broker.start() as started:
        yield started


@pytest.fixture
async def topics(broker: Broker) -> TopicSet:
    """This test's own request/reply/DLQ/quota topics and consumer group, created."""
    return await new_topics(broker)

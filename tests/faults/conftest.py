"""Fault tests get a broker of their own, and one rerun when it wedges.

Each fault test starts consumers, kills or freezes them, and waits through consumer-group
rebalances. On Tansu (the test broker) that occasionally wedges the broker itself — a
group that never assigns again, fetches that never return — which Apache Kafka does not
do (README, "Tests and benchmarks"). So every fault test runs on a fresh broker (Tansu
starts in milliseconds), and a failed one is run once more on another fresh broker. A
fault in the consumer fails both runs; pytest reports every rerun (`R` in the progress
line, "rerun" in the summary).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.harness import Broker

RERUNS = 1


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A fresh broker for this test (overrides the session-wide one)."""
    started = Broker.start()
    try:
        yield started
    finally:
        started.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in item.nodeid and item.get_closest_marker("flaky") is None:
            item.add_marker(pytest.mark.flaky(reruns=RERUNS))

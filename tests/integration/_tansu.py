"""A real Kafka-protocol broker for integration tests: Tansu on a free loopback port, or
the broker named by KAFKA_BOOTSTRAP_SERVERS."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from consumer.bus.devbroker import LocalBroker, start_local_broker

# Tansu answers a fetch only after the whole fetch_max_wait_ms (DESIGN.md), so keep it small.
FETCH_MAX_WAIT_MS = 5


@dataclass
class TansuBroker:
    """A broker the tests may use; `stop()` ends it if the tests started it."""

    bootstrap: str
    _local: LocalBroker | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Kill the broker process we started (a no-op for an external broker)."""
        if self._local is not None:
            self._local.stop(timeout_s=5.0)
            self._local = None


def start_tansu() -> TansuBroker:
    """Start Tansu with in-memory storage on 127.0.0.1, or use KAFKA_BOOTSTRAP_SERVERS if set."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        return TansuBroker(bootstrap=external)
    local = start_local_broker(timeout_s=15.0)
    return TansuBroker(bootstrap=local.bootstrap_servers, _local=local)


def unique_topic(prefix: str) -> str:
    """A topic name no other test uses (brokers may be shared; Tansu forgets nothing)."""
    return f"{prefix}.{uuid.uuid4().hex[:10]}"


async def create_topic(
    bootstrap: str, name: str, partitions: int, configs: Mapping[str, str] | None = None
) -> None:
    """Create a topic explicitly (auto-created topics get the broker's partition count)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, 1, topic_configs=dict(configs or {}))]
        )
        for topic, code, *rest in response.topic_errors:
            if code != 0:
                raise RuntimeError(f"creating topic {topic} failed: error {code} {rest}")
    finally:
        await admin.close()

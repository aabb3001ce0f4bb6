"""Create the topics opstream needs, idempotently, and say what was done."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from topics.catalog import TopicSpec

Action = Literal["created", "exists", "exists-different-partitions"]


@dataclass(frozen=True, slots=True)
class EnsureResult:
    """What `ensure_topics` found or did for one topic."""

    name: str
    action: Action
    partitions: int
    expected_partitions: int


async def ensure_topics(
    bootstrap_servers: str,
    specs: Sequence[TopicSpec],
    *,
    client_kwargs: dict[str, Any] | None = None,
    timeout_s: float = 30.0,
) -> list[EnsureResult]:
    """Create missing topics; report existing ones (partition counts are never changed)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **(client_kwargs or {}))
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        existing = await _partition_counts(admin)
        missing = [s for s in specs if s.name not in existing]
        if missing:
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            name=s.name,
                            num_partitions=s.partitions,
                            replication_factor=s.replication_factor,
                            topic_configs=dict(s.configs),
                        )
                        for s in missing
                    ]
                )
            except TopicAlreadyExistsError:
                pass  # another bootstrapper won the race; reported as created below
        results: list[EnsureResult] = []
        for spec in specs:
            if spec.name not in existing:
                results.append(EnsureResult(spec.name, "created", spec.partitions, spec.partitions))
                continue
            count = existing[spec.name]
            action: Action = "exists" if count == spec.partitions else "exists-different-partitions"
            results.append(EnsureResult(spec.name, action, count, spec.partitions))
        return results
    finally:
        await admin.close()


async def _partition_counts(admin: AIOKafkaAdminClient) -> dict[str, int]:
    metadata = await admin.describe_topics()
    counts: dict[str, int] = {}
    for topic in metadata:
        if topic.get("error_code", 0) == 0:
            counts[topic["topic"]] = len(topic.get("partitions", []))
    return counts

"""Partition ownership: state restored before a partition's records run, drained and
persisted before it moves; and the group consumer's commits and lag."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition

from consumer.intake.flow import Intake
from consumer.intake.offsets import Partition

log = logging.getLogger(__name__)


class PartitionState(Protocol):
    """State that moves with request partitions (the quota store)."""

    async def restore(self, partitions: set[int]) -> None: ...

    async def persist(self, partition: int) -> None: ...

    def forget(self, partitions: set[int]) -> None: ...


class PartitionOwner(ConsumerRebalanceListener):
    """The rebalance listener: what this instance owns, and the order of things when that
    changes.

    Assigned: restore the partitions' state, then open them in the intake. Records of them
    may already be fetched (aiokafka fetches while this listener runs); the intake holds
    them, registered and uncommitted, until `open`. Revoked: close them in the intake first
    (waiting records are left to the next owner), drain and commit their work, persist their
    state, forget it.
    """

    def __init__(
        self, *, requests_topic: str, state: PartitionState | None, drain_timeout_s: float
    ) -> None:
        self.assigned: set[Partition] = set()
        self.intake: Intake | None = None  # bound when the service starts, before consuming
        self._requests_topic = requests_topic
        self._state = state
        self._drain_timeout_s = drain_timeout_s

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        partitions = {(tp.topic, tp.partition) for tp in assigned}
        if self._state is not None:
            await self._restore_until_done({p for t, p in partitions if t == self._requests_topic})
        self.assigned |= partitions
        assert self.intake is not None, "intake not bound"
        self.intake.open(partitions)
        log.info("partitions_assigned", extra={"partitions": sorted(p for _, p in partitions)})

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        partitions = {(tp.topic, tp.partition) for tp in revoked}
        self.assigned -= partitions
        if partitions and self.intake is not None:
            await self.intake.revoke(partitions, self._drain_timeout_s)
        if self._state is not None:
            numbers = {p for t, p in partitions if t == self._requests_topic}
            for number in numbers:
                try:
                    await self._state.persist(number)
                except Exception as exc:
                    log.warning("state_persist_on_revoke_failed", extra={"error": repr(exc)[:300]})
            self._state.forget(numbers)

    async def _restore_until_done(self, partitions: set[int]) -> None:
        # A partition whose state is not restored must not serve (quotas would be wrong),
        # and dropping its records would lose them: retry until the broker answers.
        assert self._state is not None
        delay = 0.5
        while True:
            try:
                await self._state.restore(partitions)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error(
                    "state_restore_failed_retrying",
                    extra={"partitions": sorted(partitions), "error": repr(exc)[:300]},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


class GroupOffsets:
    """Commits and lag through the subscriber's aiokafka consumer, bound once it exists."""

    def __init__(self) -> None:
        self.consumer: Any = None

    async def commit(self, positions: dict[Partition, int]) -> None:
        if self.consumer is None:
            raise RuntimeError("consumer not started")
        await self.consumer.commit({TopicPartition(t, p): o for (t, p), o in positions.items()})

    def lag(self, owner: PartitionOwner) -> dict[Partition, int]:
        """High watermark minus committed offset, per owned partition (Tansu's high watermark
        is wrong, so this is off there; right on Apache Kafka)."""
        intake = owner.intake
        if self.consumer is None or intake is None:
            return {}
        lag: dict[Partition, int] = {}
        for topic, partition in sorted(owner.assigned):
            highwater = self.consumer.highwater(TopicPartition(topic, partition))
            committed = intake.committed((topic, partition))
            if highwater is not None and committed is not None:
                lag[(topic, partition)] = max(0, highwater - committed)
        return lag

    def pause_all(self) -> None:
        """Stop fetching (shutdown)."""
        if self.consumer is not None:
            self.consumer.pause(*self.consumer.assignment())

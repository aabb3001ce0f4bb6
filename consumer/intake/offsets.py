"""Offset bookkeeping: which offsets of each partition may be committed (pure, no I/O)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(slots=True)
class PartitionOffsets:
    """Fetched-but-unfinished offsets of one partition.

    An offset is registered (`begin`) the moment it is fetched, before it waits for
    anything, and finishes in any order; the commit watermark only moves past an offset
    once it and every registered offset before it have finished. So no commit can pass a
    record that was fetched and not finished, whatever order records arrive in.
    """

    _pending: list[int] = field(default_factory=list)  # sorted
    _finished: set[int] = field(default_factory=set)
    watermark: int | None = None  # next offset to consume; what Kafka's commit stores
    committed: int | None = None

    def begin(self, offset: int) -> bool:
        """Register a fetched offset; False when it is already registered or finished
        (a stale or repeated delivery, which must not run twice)."""
        if self.watermark is not None and offset < self.watermark:
            return False
        index = bisect.bisect_left(self._pending, offset)
        if index < len(self._pending) and self._pending[index] == offset:
            return False
        self._pending.insert(index, offset)
        return True

    def is_pending(self, offset: int) -> bool:
        """Whether `offset` is registered and not finished."""
        index = bisect.bisect_left(self._pending, offset)
        found = index < len(self._pending) and self._pending[index] == offset
        return found and offset not in self._finished

    def finish(self, offset: int) -> bool:
        """Mark `offset` done; True when the watermark moved."""
        index = bisect.bisect_left(self._pending, offset)
        registered = index < len(self._pending) and self._pending[index] == offset
        if not registered or offset in self._finished:
            raise ValueError(f"offset {offset} is not in flight")
        self._finished.add(offset)
        done = 0
        for pending in self._pending:
            if pending not in self._finished:
                break
            self._finished.discard(pending)
            done += 1
        if not done:
            return False
        self.watermark = self._pending[done - 1] + 1
        del self._pending[:done]
        return True

    @property
    def in_flight(self) -> int:
        return len(self._pending) - len(self._finished)

    @property
    def uncommitted(self) -> int:
        return len(self._pending)

    def to_commit(self) -> int | None:
        """The watermark if it is ahead of what was last committed."""
        if self.watermark is None or self.watermark == self.committed:
            return None
        return self.watermark


Partition = tuple[str, int]


class OffsetTracker:
    """Commit watermarks for every partition this instance is working on."""

    def __init__(self) -> None:
        self._partitions: dict[Partition, PartitionOffsets] = {}

    def begin(self, partition: Partition, offset: int) -> bool:
        """Register a fetched offset; False for a repeated or stale one (see `PartitionOffsets`)."""
        return self._partitions.setdefault(partition, PartitionOffsets()).begin(offset)

    def finish(self, partition: Partition, offset: int) -> bool:
        state = self._partitions.get(partition)
        if state is None or not state.is_pending(offset):
            return False  # revoked meanwhile: the new owner redoes it
        return state.finish(offset)

    def to_commit(self) -> dict[Partition, int]:
        """Partitions whose watermark moved since the last commit, and where to."""
        positions = {}
        for partition, state in self._partitions.items():
            offset = state.to_commit()
            if offset is not None:
                positions[partition] = offset
        return positions

    def mark_committed(self, positions: dict[Partition, int]) -> None:
        for partition, offset in positions.items():
            state = self._partitions.get(partition)
            if state is not None:
                state.committed = offset

    def in_flight(self, partitions: set[Partition] | None = None) -> int:
        return sum(
            s.in_flight
            for p, s in self._partitions.items()
            if partitions is None or p in partitions
        )

    def forget(self, partitions: set[Partition]) -> None:
        for partition in partitions:
            self._partitions.pop(partition, None)

    def committed(self, partition: Partition) -> int | None:
        state = self._partitions.get(partition)
        return state.committed if state is not None else None

    def partitions(self) -> set[Partition]:
        return set(self._partitions)

"""Offset bookkeeping: which offsets of each partition may be committed (pure, no I/O)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class PartitionOffsets:
    """In-flight offsets of one partition, in the order they were fetched.

    Offsets finish in any order; the commit watermark only moves past an offset
    once it and every offset before it have finished.
    """

    _pending: deque[int] = field(default_factory=deque)
    _finished: set[int] = field(default_factory=set)
    watermark: int | None = None  # next offset to consume; what Kafka's commit stores
    committed: int | None = None

    def begin(self, offset: int) -> None:
        if self._pending and offset <= self._pending[-1]:
            raise ValueError(f"offset {offset} is not after {self._pending[-1]}")
        self._pending.append(offset)

    def finish(self, offset: int) -> bool:
        """Mark `offset` done; True when the watermark moved."""
        if offset not in self._pending or offset in self._finished:
            raise ValueError(f"offset {offset} is not in flight")
        self._finished.add(offset)
        moved = False
        while self._pending and self._pending[0] in self._finished:
            done = self._pending.popleft()
            self._finished.discard(done)
            self.watermark = done + 1
            moved = True
        return moved

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

    def begin(self, partition: Partition, offset: int) -> None:
        self._partitions.setdefault(partition, PartitionOffsets()).begin(offset)

    def finish(self, partition: Partition, offset: int) -> bool:
        state = self._partitions.get(partition)
        if state is None:
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

"""Many requests in flight per partition, offsets committed up to the lowest unfinished one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from consumer.bus.records import InboundRecord
from consumer.intake.offsets import OffsetTracker, Partition
from consumer.pipeline.outcome import Outcome

log = logging.getLogger(__name__)

_A = TypeVar("_A")
_R = TypeVar("_R")

Process = Callable[[InboundRecord], Awaitable[Outcome]]
Durable = Callable[[Outcome], Awaitable[None]]
Commit = Callable[[dict[Partition, int]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Drained:
    """What a drain did with the in-flight records it was given."""

    handed_over: int  # not started in the engine: left uncommitted for the next owner at once
    abandoned: int  # still running when the grace ran out: left uncommitted, run again


class Intake:
    """Runs records concurrently and owns their offsets (FastStream never auto-commits).

    A record's offset becomes committable once `process` returned (its reply was
    acknowledged by the broker) and `make_durable` returned (its usage row and
    quota state are on disk / in Kafka). `submit` waits while `max_in_flight`
    records are unfinished, which stops the fetch loop: back-pressure, never drops.
    """

    def __init__(
        self,
        process: Process,
        commit: Commit,
        *,
        max_in_flight: int,
        commit_interval_s: float,
        make_durable: Durable | None = None,
        flush: Callable[[], Awaitable[None]] | None = None,
        queued: Callable[[], set[asyncio.Task[Any]]] | None = None,
        retry_backoff_s: float = 1.0,
    ) -> None:
        """`queued`: the tasks whose engine work has not started (`Engine.queued_callers`);
        a revoke or shutdown hands their records to the next owner at once instead of
        waiting for them (uncommitted: the next owner, or this instance's next start, runs
        them), so only work the model already started has to finish within the grace."""
        self._process = process
        self._commit = commit
        self._make_durable = make_durable
        self._flush = flush
        self._queued = queued
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tracker = OffsetTracker()
        self._tasks: dict[asyncio.Task[None], Partition] = {}
        self._commit_interval_s = commit_interval_s
        self._retry_backoff_s = retry_backoff_s
        self._closing = False
        self._committer: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        # A partition's records run only once it is open (its state restored). Each revoke
        # starts a new generation: a record fetched in an earlier one is never started.
        self._open: set[Partition] = set()
        self._generation: dict[Partition, int] = {}
        self._changed = asyncio.Event()  # replaced after each wake-up (see `_wake`)
        self.on_outcome: list[Callable[[Outcome], None]] = []
        # Told how many records a drain gave up on, and why ("revoke" | "shutdown").
        self.on_abandoned: list[Callable[[int, str], None]] = []

    def start(self) -> None:
        self._committer = asyncio.create_task(self._commit_loop(), name="opstream-committer")

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def committed(self, partition: Partition) -> int | None:
        """The last offset this instance committed for `partition` (None: not yet)."""
        return self._tracker.committed(partition)

    def open(self, partitions: set[Partition]) -> None:
        """Assignment: the partitions' state is restored, their records may run."""
        self._open |= partitions
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def submit(self, record: InboundRecord) -> None:
        """Take one fetched record; waits while its partition is not open or the in-flight
        bound is reached (which stops the fetch loop: back-pressure, never drops).

        The offset is registered before any wait, so no commit can pass it until it has
        finished; it is only let go when its partition is revoked (the next owner, or
        this instance's next generation, fetches it again from the committed offset).
        """
        if self._closing:
            return  # shutting down: left uncommitted, so it is redelivered
        partition = (record.topic, record.partition)
        generation = self._generation.get(partition, 0)
        if not self._tracker.begin(partition, record.offset):
            log.warning(
                "record_already_taken",
                extra={"partition": record.partition, "offset": record.offset},
            )
            return
        while not (
            partition in self._open
            or self._closing
            or self._generation.get(partition, 0) != generation
        ):
            await self._changed.wait()
        await self._slots.acquire()
        if self._closing or self._generation.get(partition, 0) != generation:
            # Revoked (or shutting down) while this record waited: it stays uncommitted.
            self._slots.release()
            return
        task = asyncio.create_task(
            self._run(record), name=f"opstream-{record.partition}-{record.offset}"
        )
        self._tasks[task] = partition
        task.add_done_callback(self._tasks.pop)

    async def _run(self, record: InboundRecord) -> None:
        # The slot bounds work that needs the engine; waiting for durability (a usage
        # batch flushes every few seconds) must not hold it, or throughput collapses.
        try:
            outcome = await self._retry_until_done(self._process, record)
        finally:
            self._slots.release()
        if self._make_durable is not None:
            await self._retry_until_done(self._make_durable, outcome)
        for listener in self.on_outcome:
            listener(outcome)
        # A revoke waits for this (or cancels it), so the offset is still ours to finish.
        if self._tracker.finish((record.topic, record.partition), record.offset):
            self._dirty.set()

    async def _retry_until_done(self, step: Callable[[_A], Awaitable[_R]], arg: _A) -> _R:
        # Only broker/disk failures reach here (the processor turns request failures
        # into replies), so waiting for the outage to pass is the right thing.
        delay = self._retry_backoff_s
        while True:
            try:
                return await step(arg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "intake_step_failed_retrying",
                    extra={"step": getattr(step, "__name__", "step"), "error": repr(exc)[:300]},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _commit_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self._commit_interval_s)
            self._dirty.clear()
            await self.commit_now()

    async def commit_now(self) -> None:
        """Commit every partition's watermark that moved since the last commit."""
        async with self._commit_lock:
            positions = self._tracker.to_commit()
            if not positions:
                return
            try:
                await self._commit(positions)
            except Exception as exc:
                # Not fatal: the next commit carries a later watermark; a crash only redelivers.
                log.warning("commit_failed", extra={"error": repr(exc)[:300]})
                self._dirty.set()
                return
            self._tracker.mark_committed(positions)

    async def drain(self, partitions: set[Partition] | None, timeout_s: float) -> Drained:
        """Hand over the in-flight records (of `partitions`, or all) whose engine work has not
        started, wait up to `timeout_s` for the rest to finish, then commit what finished."""
        tasks = {t for t, p in self._tasks.items() if partitions is None or p in partitions}
        handed = tasks & self._queued() if self._queued is not None else set()
        for task in handed:
            task.cancel()  # uncommitted: the next owner runs it (nothing of it ran here)
        pending = tasks - handed
        if pending:
            loop = asyncio.get_running_loop()
            give_up_at = loop.time() + timeout_s
            while pending:
                if self._flush is not None:
                    await self._flush()  # finished requests wait on their usage rows
                left = give_up_at - loop.time()
                if left <= 0:
                    break
                _, pending = await asyncio.wait(pending, timeout=min(left, 0.05))
            for task in pending:
                task.cancel()  # abandoned: uncommitted, so the next owner redoes it
        if handed:
            await asyncio.wait(handed)  # their offsets must not be committed past
        await self.commit_now()
        return Drained(handed_over=len(handed), abandoned=len(pending))

    async def revoke(self, partitions: set[Partition], timeout_s: float) -> None:
        """Rebalance: take no more records of `partitions`, hand over what has not started in
        the engine, finish (or abandon) the rest, commit it, forget them."""
        self._open -= partitions
        for partition in partitions:
            self._generation[partition] = self._generation.get(partition, 0) + 1
        self._wake()
        started = asyncio.get_running_loop().time()
        drained = await self.drain(partitions, timeout_s)
        self._tracker.forget(partitions)
        log.info(
            "partitions_revoked",
            extra={
                "partitions": sorted(p for _, p in partitions),
                "drained": not drained.abandoned,
                "handed_over": drained.handed_over,
                "abandoned": drained.abandoned,
                "drain_ms": round((asyncio.get_running_loop().time() - started) * 1000),
            },
        )
        self._tell_abandoned(drained.abandoned, "revoke")

    async def close(self, timeout_s: float) -> None:
        """Graceful shutdown: take no more records, hand over what has not started in the
        engine, finish the rest, commit."""
        self._closing = True
        self._wake()
        drained = await self.drain(None, timeout_s)
        log.info(
            "intake_closed",
            extra={"handed_over": drained.handed_over, "abandoned": drained.abandoned},
        )
        self._tell_abandoned(drained.abandoned, "shutdown")
        if self._committer is not None:
            self._committer.cancel()

    def _tell_abandoned(self, count: int, reason: str) -> None:
        if count:
            for listener in self.on_abandoned:
                listener(count, reason)

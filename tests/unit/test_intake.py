"""Intake with a fake `process` and `commit`: concurrency, back-pressure and what gets committed."""

from __future__ import annotations

import asyncio
import time

from consumer.bus.records import InboundRecord
from consumer.intake.flow import Intake
from consumer.intake.offsets import Partition
from consumer.pipeline.outcome import Outcome
from tests.support.waiting import wait_until

TOPIC = "ops.requests.v1"
P0: Partition = (TOPIC, 0)
P1: Partition = (TOPIC, 1)


def rec(offset: int, partition: int = 0) -> InboundRecord:
    return InboundRecord(
        topic=TOPIC,
        partition=partition,
        offset=offset,
        key=None,
        value=b"{}",
        headers=(),
        timestamp_ms=0,
        received_at=time.time(),
    )


class Gated:
    """A `process` whose every record waits for its own gate; counts concurrency."""

    def __init__(self) -> None:
        self.gates: dict[tuple[int, int], asyncio.Event] = {}
        self.started: list[tuple[int, int]] = []
        self.running = 0
        self.peak = 0

    def gate(self, offset: int, partition: int = 0) -> asyncio.Event:
        return self.gates.setdefault((partition, offset), asyncio.Event())

    def open(self, offset: int, partition: int = 0) -> None:
        self.gate(offset, partition).set()

    async def __call__(self, record: InboundRecord) -> Outcome:
        self.started.append((record.partition, record.offset))
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gate(record.offset, record.partition).wait()
        finally:
            self.running -= 1
        return Outcome(record=record, status="ok")


class Commits:
    def __init__(self) -> None:
        self.calls: list[dict[Partition, int]] = []
        self.fail_next = 0

    async def __call__(self, positions: dict[Partition, int]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("commit failed")
        self.calls.append(dict(positions))

    def last(self, partition: Partition) -> int | None:
        found = [c[partition] for c in self.calls if partition in c]
        return found[-1] if found else None


def make(
    max_in_flight: int = 16, commit_interval_s: float = 0.01, **kwargs: object
) -> tuple[Intake, Gated, Commits]:
    process, commits = Gated(), Commits()
    intake = Intake(
        process,
        commits,
        max_in_flight=max_in_flight,
        commit_interval_s=commit_interval_s,
        retry_backoff_s=0.01,
        **kwargs,  # type: ignore[arg-type]
    )
    intake.open({P0, P1})
    return intake, process, commits


async def test_commits_only_up_to_the_lowest_unfinished_offset() -> None:
    intake, process, commits = make()
    intake.start()
    for offset in range(4):
        await intake.submit(rec(offset))
    process.open(1)
    process.open(2)
    await wait_until(lambda: intake.in_flight == 2)
    await intake.commit_now()
    assert commits.calls == []  # offset 0 is still running

    process.open(0)
    await wait_until(lambda: commits.last(P0) == 3)  # 0..2 done; 3 still running
    assert intake.committed(P0) == 3

    process.open(3)
    await wait_until(lambda: commits.last(P0) == 4)
    await intake.close(1.0)


async def test_partitions_commit_independently() -> None:
    intake, process, commits = make()
    intake.start()
    await intake.submit(rec(10, partition=0))
    await intake.submit(rec(20, partition=1))
    process.open(20, partition=1)
    await wait_until(lambda: commits.last(P1) == 21)
    assert commits.last(P0) is None
    await intake.close(0.1)


async def test_max_in_flight_bounds_concurrency_and_submit_waits() -> None:
    intake, process, _ = make(max_in_flight=2)
    await intake.submit(rec(0))
    await intake.submit(rec(1))
    third = asyncio.create_task(intake.submit(rec(2)))
    await asyncio.sleep(0.05)
    assert not third.done(), "submit must wait while max_in_flight records run"
    assert process.started == [(0, 0), (0, 1)]

    process.open(1)
    await asyncio.wait_for(third, 1.0)
    await wait_until(lambda: (0, 2) in process.started)
    assert process.peak == 2
    process.open(0)
    process.open(2)
    await intake.drain(None, 1.0)
    assert process.peak == 2


async def test_waiting_for_durability_does_not_hold_an_in_flight_slot() -> None:
    durable = asyncio.Event()
    awaiting_durability: list[int] = []

    async def make_durable(outcome: Outcome) -> None:
        awaiting_durability.append(outcome.record.offset)
        await durable.wait()

    intake, process, commits = make(max_in_flight=1, make_durable=make_durable)
    intake.start()
    process.open(0)
    process.open(1)
    await intake.submit(rec(0))
    await asyncio.wait_for(intake.submit(rec(1)), 1.0)  # slot freed though 0 is not durable
    await wait_until(lambda: sorted(awaiting_durability) == [0, 1])  # both processed
    await intake.commit_now()
    assert commits.calls == []  # nothing is committable before it is durable
    durable.set()
    await wait_until(lambda: commits.last(P0) == 2)
    await intake.close(1.0)


async def test_failed_process_is_retried_until_it_succeeds() -> None:
    attempts = 0

    async def flaky(record: InboundRecord) -> Outcome:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionError("broker unreachable")
        return Outcome(record=record, status="ok")

    commits = Commits()
    intake = Intake(flaky, commits, max_in_flight=4, commit_interval_s=0.01, retry_backoff_s=0.01)
    intake.open({P0})
    intake.start()
    await intake.submit(rec(5))
    await wait_until(lambda: commits.last(P0) == 6)
    assert attempts == 3
    await intake.close(0.1)


async def test_failed_commit_is_retried_with_the_latest_watermark() -> None:
    intake, process, commits = make(commit_interval_s=0.01)
    commits.fail_next = 1
    intake.start()
    await intake.submit(rec(0))
    process.open(0)
    await wait_until(lambda: commits.last(P0) == 1)
    assert intake.committed(P0) == 1
    await intake.close(0.1)


async def test_outcome_listeners_hear_every_finished_record() -> None:
    intake, process, _ = make()
    heard: list[int] = []
    intake.on_outcome.append(lambda outcome: heard.append(outcome.record.offset))
    for offset in (0, 1):
        process.open(offset)
        await intake.submit(rec(offset))
    await intake.drain(None, 1.0)
    assert sorted(heard) == [0, 1]


async def test_drain_waits_for_in_flight_work_then_commits() -> None:
    intake, process, commits = make(commit_interval_s=60.0)  # only drain commits here
    intake.start()
    for offset in range(3):
        await intake.submit(rec(offset))
    asyncio.get_running_loop().call_later(0.05, lambda: [process.open(o) for o in range(3)])
    assert (await intake.drain(None, 2.0)).abandoned == 0  # nothing abandoned
    assert commits.last(P0) == 3
    await intake.close(0.1)


async def test_drain_abandons_work_past_its_timeout_uncommitted() -> None:
    flushed = 0

    async def flush() -> None:
        nonlocal flushed
        flushed += 1

    intake, process, commits = make(commit_interval_s=60.0, flush=flush)
    await intake.submit(rec(0))
    await intake.submit(rec(1))
    process.open(0)
    assert (await intake.drain(None, 0.2)).abandoned == 1  # offset 1 never finishes
    assert commits.last(P0) == 1
    assert flushed >= 1
    await wait_until(lambda: intake.in_flight == 0)  # the stuck one was cancelled


async def test_revoke_commits_the_revoked_partition_and_forgets_it() -> None:
    intake, process, commits = make(commit_interval_s=60.0)
    intake.start()
    await intake.submit(rec(0, partition=0))
    await intake.submit(rec(0, partition=1))
    process.open(0, partition=0)
    await intake.revoke({P0}, 1.0)
    assert commits.calls == [{P0: 1}]
    assert intake.committed(P0) is None  # forgotten: a new owner takes over

    process.open(0, partition=1)
    await intake.drain(None, 1.0)
    assert commits.last(P1) == 1


async def test_revoke_abandons_unfinished_work_without_committing_it_and_counts_it() -> None:
    intake, _, commits = make(commit_interval_s=60.0)
    abandoned: list[tuple[int, str]] = []
    intake.on_abandoned.append(lambda count, reason: abandoned.append((count, reason)))
    await intake.submit(rec(7))
    await intake.submit(rec(8))
    await intake.revoke({P0}, 0.05)
    assert commits.calls == []
    assert abandoned == [(2, "revoke")]
    await wait_until(lambda: intake.in_flight == 0)


async def test_revoke_hands_over_work_not_started_in_the_engine_at_once() -> None:
    """Records whose engine work is still queued are left uncommitted for the next owner at
    once; only work the model started is waited for (so a deep queue drains in time)."""
    queued_offsets = {2, 3}

    def queued() -> set[asyncio.Task[object]]:
        return {t for t in asyncio.all_tasks() if t.get_name() in {"opstream-0-2", "opstream-0-3"}}

    intake, process, commits = make(commit_interval_s=60.0, queued=queued)
    abandoned: list[tuple[int, str]] = []
    intake.on_abandoned.append(lambda count, reason: abandoned.append((count, reason)))
    for offset in range(4):
        await intake.submit(rec(offset))
    asyncio.get_running_loop().call_later(0.05, lambda: [process.open(o) for o in (0, 1)])
    started = time.perf_counter()
    await intake.revoke({P0}, 5.0)
    assert time.perf_counter() - started < 1.0  # did not wait for the queued ones
    assert commits.calls == [{P0: 2}]  # offsets 0 and 1 finished; 2 and 3 stay for the next
    assert abandoned == []  # handed over is not abandoned
    assert not queued_offsets & {o for _, o in process.started if process.gate(o).is_set()}
    await wait_until(lambda: intake.in_flight == 0)


async def test_close_finishes_in_flight_work_and_takes_no_more_records() -> None:
    intake, process, commits = make(commit_interval_s=60.0)
    intake.start()
    await intake.submit(rec(0))
    process.open(0)
    await intake.close(1.0)
    assert commits.last(P0) == 1

    await intake.submit(rec(1))
    assert intake.in_flight == 0  # refused at once: a taken record would be in flight
    assert process.started == [(0, 0)]


async def test_submit_waiting_for_a_slot_gives_up_when_closed() -> None:
    intake, process, _ = make(max_in_flight=1, commit_interval_s=60.0)
    await intake.submit(rec(0))
    waiting = asyncio.create_task(intake.submit(rec(1)))
    await asyncio.sleep(0.02)
    closing = asyncio.create_task(intake.close(1.0))
    await asyncio.sleep(0.02)
    process.open(0)
    await asyncio.wait_for(asyncio.gather(waiting, closing), 2.0)
    assert process.started == [(0, 0)]


P2: Partition = (TOPIC, 2)  # not opened by `make`: its state is "still restoring"


async def test_record_of_a_partition_still_restoring_waits_and_then_runs() -> None:
    intake, process, commits = make(commit_interval_s=0.01)
    intake.start()
    waiting = asyncio.create_task(intake.submit(rec(5, partition=2)))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the fetch loop is held, the record is not dropped
    assert process.started == []

    intake.open({P2})
    await asyncio.wait_for(waiting, 1.0)
    process.open(5, partition=2)
    await wait_until(lambda: commits.last(P2) == 6)
    assert process.started == [(2, 5)]
    await intake.close(1.0)


async def test_record_waiting_for_restore_is_left_uncommitted_when_revoked() -> None:
    intake, process, commits = make(commit_interval_s=0.01)
    intake.start()
    waiting = asyncio.create_task(intake.submit(rec(5, partition=2)))
    await asyncio.sleep(0.02)
    await intake.revoke({P2}, 1.0)  # revoked during the restore
    await asyncio.wait_for(waiting, 1.0)
    assert process.started == []
    assert commits.last(P2) is None  # the next owner fetches offset 5 again
    await intake.close(1.0)


async def test_second_rebalance_during_restore_runs_each_record_once_from_committed() -> None:
    intake, process, commits = make(commit_interval_s=0.01)
    intake.start()
    stale = [asyncio.create_task(intake.submit(rec(o, partition=2))) for o in (5, 6)]
    await asyncio.sleep(0.02)
    await intake.revoke({P2}, 1.0)  # first generation never opened
    # Assigned again: the fetch restarts at the committed offset while the new restore runs.
    fresh = asyncio.create_task(intake.submit(rec(5, partition=2)))
    await asyncio.sleep(0.02)
    intake.open({P2})
    await asyncio.wait_for(asyncio.gather(*stale, fresh), 1.0)
    await intake.submit(rec(6, partition=2))
    process.open(5, partition=2)
    process.open(6, partition=2)
    await wait_until(lambda: commits.last(P2) == 7)
    assert sorted(process.started) == [(2, 5), (2, 6)]
    await intake.close(1.0)


async def test_no_commit_passes_a_record_waiting_for_a_slot() -> None:
    intake, process, commits = make(max_in_flight=1, commit_interval_s=0.01)
    intake.start()
    await intake.submit(rec(0))
    waiting = asyncio.create_task(intake.submit(rec(1)))
    process.open(0)
    await wait_until(lambda: commits.last(P0) == 1)
    await asyncio.wait_for(waiting, 1.0)
    await intake.commit_now()
    assert commits.last(P0) == 1  # offset 1 is running, not done
    process.open(1)
    await wait_until(lambda: commits.last(P0) == 2)
    await intake.close(1.0)


async def test_work_finishing_after_its_partition_was_revoked_and_reassigned_commits_nothing() -> (
    None
):
    intake, process, commits = make(commit_interval_s=0.01)
    intake.start()
    durable = asyncio.Event()

    async def slow_durable(outcome: Outcome) -> None:
        await durable.wait()

    intake._make_durable = slow_durable
    await intake.submit(rec(3))
    process.open(3)
    revoking = asyncio.create_task(intake.revoke({P0}, 0.05))  # gives up on offset 3
    await asyncio.wait_for(revoking, 1.0)
    intake.open({P0})
    durable.set()
    await asyncio.sleep(0.05)
    assert commits.last(P0) is None
    await intake.close(1.0)

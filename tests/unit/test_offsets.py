"""OffsetTracker: the commit watermark never passes an offset that has not finished."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.intake.offsets import OffsetTracker, PartitionOffsets

P = ("ops.requests.v1", 0)
Q = ("ops.requests.v1", 1)


def test_watermark_moves_only_when_the_lowest_offset_finishes() -> None:
    state = PartitionOffsets()
    for offset in (4, 5, 6):
        state.begin(offset)
    assert state.finish(6) is False
    assert state.finish(5) is False
    assert state.watermark is None and state.to_commit() is None
    assert state.finish(4) is True
    assert state.watermark == 7
    assert state.in_flight == 0 and state.uncommitted == 0


def test_offsets_with_gaps_commit_past_the_gap() -> None:
    state = PartitionOffsets()
    state.begin(10)
    state.begin(15)  # 11..14 were compacted away or are transaction markers
    state.finish(10)
    assert state.watermark == 11
    state.finish(15)
    assert state.watermark == 16


def test_to_commit_reports_a_watermark_once() -> None:
    tracker = OffsetTracker()
    tracker.begin(P, 0)
    tracker.finish(P, 0)
    assert tracker.to_commit() == {P: 1}
    tracker.mark_committed({P: 1})
    assert tracker.to_commit() == {}
    assert tracker.committed(P) == 1


def test_an_offset_is_taken_once_and_finishes_once() -> None:
    state = PartitionOffsets()
    assert state.begin(3) is True
    assert state.begin(3) is False  # a repeated delivery does not run twice
    assert state.begin(2) is True  # out of order: still holds the watermark back
    with pytest.raises(ValueError):
        state.finish(9)
    state.finish(3)
    assert state.watermark is None  # 2 is not finished
    state.finish(2)
    assert state.watermark == 4
    assert state.begin(3) is False  # already done: a stale delivery
    state.begin(4)
    state.finish(4)
    with pytest.raises(ValueError):
        state.finish(4)


def test_forgotten_partition_is_not_committed_and_late_finishes_are_ignored() -> None:
    tracker = OffsetTracker()
    tracker.begin(P, 0)
    tracker.begin(Q, 0)
    tracker.forget({P})
    assert tracker.finish(P, 0) is False
    tracker.finish(Q, 0)
    assert tracker.to_commit() == {Q: 1}
    assert tracker.partitions() == {Q}
    assert tracker.committed(P) is None


def test_in_flight_counts_per_partition() -> None:
    tracker = OffsetTracker()
    for offset in range(3):
        tracker.begin(P, offset)
    tracker.begin(Q, 0)
    tracker.finish(P, 2)
    assert tracker.in_flight() == 3
    assert tracker.in_flight({P}) == 2
    assert tracker.in_flight({Q}) == 1


@st.composite
def fetch_and_finish(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Increasing offsets (with gaps) and the order a random subset of them finishes in."""
    gaps = draw(st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=40))
    offsets = []
    position = draw(st.integers(min_value=0, max_value=1000))
    for gap in gaps:
        offsets.append(position)
        position += gap
    finished = draw(st.permutations(offsets))
    cut = draw(st.integers(min_value=0, max_value=len(finished)))
    return offsets, list(finished[:cut])


@given(fetch_and_finish(), st.integers(min_value=1, max_value=5))
def test_committed_watermark_never_passes_an_unfinished_offset(
    case: tuple[list[int], list[int]], commit_every: int
) -> None:
    offsets, finish_order = case
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.begin(P, offset)
    done: set[int] = set()
    committed: int | None = None
    for step, offset in enumerate(finish_order, start=1):
        tracker.finish(P, offset)
        done.add(offset)
        if step % commit_every == 0:
            positions = tracker.to_commit()
            if P in positions:
                assert committed is None or positions[P] > committed  # only ever forward
                committed = positions[P]
                tracker.mark_committed(positions)
        if committed is not None:
            # Everything below the committed position has finished...
            assert all(o in done for o in offsets if o < committed)
    final = tracker.to_commit().get(P, committed)
    unfinished = [o for o in offsets if o not in done]
    if unfinished:
        # ...and the watermark stops exactly at the lowest unfinished offset (or before any).
        lowest = min(unfinished)
        assert final is None or final <= lowest
        if lowest != offsets[0]:
            assert final == offsets[offsets.index(lowest) - 1] + 1
    else:
        assert final == offsets[-1] + 1


@given(st.lists(st.tuples(st.sampled_from(["begin", "finish"]), st.integers(0, 30)), max_size=80))
def test_no_interleaving_of_fetches_and_finishes_commits_past_a_fetched_unfinished_offset(
    steps: list[tuple[str, int]],
) -> None:
    state = PartitionOffsets()
    taken: set[int] = set()
    done: set[int] = set()
    for action, offset in steps:
        if action == "begin":
            if state.begin(offset):
                assert offset not in taken  # each offset is taken at most once
                taken.add(offset)
        elif offset in taken and offset not in done:
            state.finish(offset)
            done.add(offset)
        unfinished = taken - done
        if state.watermark is not None and unfinished:
            assert state.watermark <= min(unfinished)

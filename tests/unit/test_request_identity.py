"""Which records may run under an already-charged request_id: the same record only (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.errors import DuplicateRequest, QuotaExceeded
from consumer.quota.ledger import AnsweredBefore, QuotaLedger, RepeatedRecord
from consumer.quota.limit_book import DailyCap, LimitBook, LimitDefaults

NOON = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)


def ledger(requests: int | None = 2) -> QuotaLedger:
    book = LimitBook(LimitDefaults(operation=DailyCap(requests, None)))
    return QuotaLedger(0, book, ZoneInfo("UTC"))


def reserve(led: QuotaLedger, request_id: str, origin: str, fingerprint: str, **kw: object):
    return led.reserve(
        "acme",
        "chat",
        request_id,
        10,
        20,
        kw.pop("now", NOON),  # type: ignore[arg-type]
        origin=origin,
        fingerprint=fingerprint,
    )


def test_the_same_record_redelivered_runs_again_uncharged() -> None:
    led = ledger()
    first = reserve(led, "r1", "t/0/5", "f1")
    again = reserve(led, "r1", "t/0/5", "f1")
    assert not first.duplicate and again.duplicate
    assert led.usage("acme", "chat", NOON).requests == 1


def test_a_different_request_reusing_a_charged_id_is_refused_naming_the_original() -> None:
    led = ledger(requests=100)
    reservation = reserve(led, "r1", "t/0/5", "f1")
    with pytest.raises(DuplicateRequest) as running:
        reserve(led, "r1", "t/0/6", "f2")
    assert running.value.details["original_status"] == "in_progress"
    led.settle(reservation, 10, 3, "ok")
    with pytest.raises(DuplicateRequest) as done:
        reserve(led, "r1", "t/0/7", "f3")
    assert done.value.details["original_status"] == "ok"
    assert done.value.retryable is False
    assert led.usage("acme", "chat", NOON).requests == 1


def test_a_verbatim_copy_at_another_offset_is_a_repeat_not_a_new_run() -> None:
    led = ledger()
    reserve(led, "r1", "t/0/5", "f1")
    with pytest.raises(RepeatedRecord):
        reserve(led, "r1", "t/0/9", "f1")
    assert led.usage("acme", "chat", NOON).requests == 1


def test_a_new_attempt_after_a_retryable_failure_replaces_the_charge() -> None:
    led = ledger(requests=1)
    failed = reserve(led, "r1", "t/0/5", "f1")
    led.settle(failed, 0, 0, "internal")
    retry = reserve(led, "r1", "t/0/8", "f2")  # re-signed: another record, same id
    assert not retry.duplicate
    assert led.usage("acme", "chat", NOON).requests == 1  # counted once, limit 1 holds
    with pytest.raises(QuotaExceeded):
        reserve(led, "r2", "t/0/9", "f3")


def test_a_failure_that_is_not_retryable_keeps_the_id_taken() -> None:
    led = ledger()
    failed = reserve(led, "r1", "t/0/5", "f1")
    led.settle(failed, 0, 0, "validation")
    with pytest.raises(DuplicateRequest):
        reserve(led, "r1", "t/0/8", "f2")


def test_a_new_attempt_after_a_request_that_never_ran_runs_and_is_charged_once() -> None:
    led = ledger(requests=1)
    expired = reserve(led, "r1", "t/0/5", "f1")
    led.settle(expired, 0, 0, "deadline_exceeded", ran=False)
    assert led.usage("acme", "chat", NOON).requests == 0
    retry = reserve(led, "r1", "t/0/8", "f2")  # sent again with a longer timeout
    assert not retry.duplicate
    assert led.usage("acme", "chat", NOON).requests == 1
    with pytest.raises(QuotaExceeded):
        reserve(led, "r2", "t/0/9", "f3")


def test_a_verbatim_copy_of_an_expired_request_is_a_repeat_of_an_overloaded_one_a_retry() -> None:
    led = ledger()
    expired = reserve(led, "r1", "t/0/5", "f1")
    led.settle(expired, 0, 0, "deadline_exceeded", ran=False)
    with pytest.raises(RepeatedRecord):
        reserve(led, "r1", "t/0/9", "f1")  # its answer stands
    busy = reserve(led, "r2", "t/0/6", "f2")
    led.settle(busy, 0, 0, "overloaded", ran=False)
    assert not reserve(led, "r2", "t/0/10", "f2").duplicate  # a producer's retry runs
    assert led.usage("acme", "chat", NOON).requests == 1


@pytest.mark.parametrize("outcome", ["overloaded", "deadline_exceeded", "cancelled"])
def test_the_same_record_answered_without_running_is_answered_alike_when_redelivered(
    outcome: str,
) -> None:
    """A rebalance or crash redelivers a record answered `overloaded` (or expired, or
    cancelled before it started): the same answer again, not a run with another outcome."""
    led = ledger()
    first = reserve(led, "r1", "t/0/5", "f1")
    led.settle(first, 0, 0, outcome, ran=False)
    with pytest.raises(AnsweredBefore) as again:
        reserve(led, "r1", "t/0/5", "f1")
    assert again.value.outcome == outcome
    assert led.usage("acme", "chat", NOON).requests == 0


def test_the_same_record_that_failed_before_running_is_decided_again() -> None:
    led = ledger()
    first = reserve(led, "r1", "t/0/5", "f1")
    led.settle(first, 0, 0, "internal", ran=False)
    assert not reserve(led, "r1", "t/0/5", "f1").duplicate  # retried: it may succeed now
    assert led.usage("acme", "chat", NOON).requests == 1


def test_an_id_charged_yesterday_is_still_taken_today() -> None:
    led = ledger()
    reserve(led, "r1", "t/0/5", "f1", now=NOON - timedelta(days=1))
    with pytest.raises(RepeatedRecord):
        reserve(led, "r1", "t/0/9", "f1")


record_kinds = st.sampled_from(["new", "same-id-new-body", "verbatim-copy", "redelivery"])


@given(st.lists(record_kinds, min_size=1, max_size=40), st.integers(0, 5))
def test_no_sequence_of_records_runs_more_requests_than_the_limit(
    kinds: list[str], limit: int
) -> None:
    """Whatever a producer writes — new ids, reused ids, copies, redeliveries — the charged
    requests never exceed the limit, and each run is either charged or a redelivery of a
    charged record."""
    led = ledger(requests=limit)
    taken: list[tuple[str, str, str]] = []  # (request_id, origin, fingerprint) charged
    runs_charged = 0
    for offset, kind in enumerate(kinds):
        origin = f"t/0/{offset}"
        if kind == "new" or not taken:
            rid, fp = f"r{offset}", f"f{offset}"
        elif kind == "same-id-new-body":
            rid, fp = taken[-1][0], f"f{offset}"
        elif kind == "verbatim-copy":
            rid, _, fp = taken[-1]
        else:
            rid, origin, fp = taken[-1]
        try:
            reservation = reserve(led, rid, origin, fp)
        except (QuotaExceeded, DuplicateRequest, RepeatedRecord, AnsweredBefore):
            continue
        if reservation.duplicate:
            assert (rid, origin, fp) in taken
        else:
            runs_charged += 1
            taken.append((rid, origin, fp))
    assert runs_charged <= limit
    assert led.usage("acme", "chat", NOON).requests == runs_charged


endings = st.sampled_from(["ok", "ran-and-failed", "never-ran", "running"])


@given(st.lists(st.tuples(record_kinds, endings), min_size=1, max_size=40), st.integers(0, 5))
def test_no_sequence_of_records_and_outcomes_counts_more_than_what_ran(
    steps: list[tuple[str, str]], limit: int
) -> None:
    """Records of every kind ending every way: the requests counted are exactly the charged
    runs that ran (or still run), never more than the limit."""
    led = ledger(requests=limit)
    taken: list[tuple[str, str, str]] = []
    state: dict[str, str] = {}  # request_id -> "running" | "ran" | "released"
    for offset, (kind, ending) in enumerate(steps):
        origin = f"t/0/{offset}"
        if kind == "new" or not taken:
            rid, fp = f"r{offset}", f"f{offset}"
        elif kind == "same-id-new-body":
            rid, fp = taken[-1][0], f"f{offset}"
        elif kind == "verbatim-copy":
            rid, _, fp = taken[-1]
        else:
            rid, origin, fp = taken[-1]
        try:
            reservation = reserve(led, rid, origin, fp)
        except (QuotaExceeded, DuplicateRequest, RepeatedRecord, AnsweredBefore):
            continue
        if not reservation.duplicate:
            state[rid] = "running"
            taken.append((rid, origin, fp))
        if ending == "ok":
            led.settle(reservation, 10, 5, "ok")
            state[rid] = "ran"
        elif ending == "ran-and-failed":
            led.settle(reservation, 10, 5, "internal", ran=True)
            state[rid] = "ran"
        elif ending == "never-ran":
            led.settle(reservation, 0, 0, "overloaded", ran=False)
            if state[rid] == "running":  # a run that ran before keeps its charge
                state[rid] = "released"
        counts = sum(s != "released" for s in state.values())
        assert led.usage("acme", "chat", NOON).requests == counts <= limit

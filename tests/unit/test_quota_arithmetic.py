"""Quota arithmetic: limit resolution, quota days, reserve/settle and the ledger, exhaustively."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.errors import QuotaExceeded
from consumer.quota.days import day_of, day_start, resets_at
from consumer.quota.ledger import Charge, QuotaLedger, Reservation
from consumer.quota.limit_book import (
    KEEP,
    DailyCap,
    LimitBook,
    LimitDefaults,
    Override,
    Usage,
    first_trip,
    limit_defaults,
    merge_override,
)
from consumer.quota.partitions import partition_for_tenant
from consumer.settings.quota import QuotaSettings
from schemas.quota import QuotaCharge
from schemas.replies import HTTP_STATUS

UTC_ZONE = ZoneInfo("UTC")
NOON = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)


def book(requests: int | None = 3, tokens: int | None = None, **kw: DailyCap) -> LimitBook:
    total = kw.get("total", DailyCap(None, None))
    return LimitBook(LimitDefaults(operation=DailyCap(requests, tokens), total=total))


def ledger(b: LimitBook | None = None, tz: str = "UTC") -> QuotaLedger:
    return QuotaLedger(0, b or book(), ZoneInfo(tz))


# ── limits ──


def test_defaults_come_from_settings_per_operation_and_total() -> None:
    s = QuotaSettings(
        default_daily_requests=1000,
        default_daily_tokens="unlimited",
        operation_defaults={"chat": {"requests": 50}},
        total_daily_tokens=9000,
    )
    b = LimitBook(limit_defaults(s))
    assert b.resolve("acme", "summarize") == DailyCap(1000, None)
    assert b.resolve("acme", "chat") == DailyCap(50, None)
    assert b.resolve("acme", "*") == DailyCap(None, 9000)


def test_settings_reject_unknown_time_zone() -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        QuotaSettings(timezone="Mars/Olympus")


def test_tenant_override_beats_all_tenant_override_beats_settings_field_by_field() -> None:
    b = book(requests=1000, tokens=50_000)
    b.set_override("*", "summarize", Override(requests=10))
    assert b.resolve("acme", "summarize") == DailyCap(10, 50_000)
    b.set_override("acme", "summarize", Override(tokens="unlimited"))
    assert b.resolve_with_sources("acme", "summarize") == (
        DailyCap(10, None),
        ("all-tenants", "tenant"),
    )
    assert b.resolve("other", "summarize") == DailyCap(10, 50_000)
    b.set_override("acme", "summarize", Override(requests=0))
    assert b.resolve("acme", "summarize") == DailyCap(0, 50_000)


def test_deleting_or_emptying_an_override_falls_back() -> None:
    b = book(requests=1000)
    b.set_override("acme", "chat", Override(requests=5))
    b.delete_override("acme", "chat")
    assert b.resolve("acme", "chat").requests == 1000
    b.set_override("acme", "chat", Override(requests=5))
    b.set_override("acme", "chat", Override())
    assert b.override("acme", "chat") is None


def test_merge_override_keeps_fields_not_given() -> None:
    current = Override(requests=5, tokens=100)
    assert merge_override(current, requests=7, tokens=KEEP) == Override(7, 100)
    assert merge_override(current, requests=KEEP, tokens=None) == Override(5, None)
    assert merge_override(None, requests="unlimited", tokens=KEEP) == Override("unlimited", None)


# ── first_trip, exhaustively over small numbers ──

CAPS = (None, 0, 1, 2, 3)
USED = (0, 1, 2, 3)


def test_first_trip_matches_every_limit_in_order_exhaustively() -> None:
    for op_req, tot_req, op_tok, tot_tok in itertools.product(CAPS, repeat=4):
        for used_req, used_tot_req, used_tok, used_tot_tok, tokens in itertools.product(
            USED, USED, USED, USED, (0, 1, 2)
        ):
            trip = first_trip(
                operation="chat",
                operation_cap=DailyCap(op_req, op_tok),
                operation_used=Usage(used_req, used_tok),
                total_cap=DailyCap(tot_req, tot_tok),
                total_used=Usage(used_tot_req, used_tot_tok),
                tokens=tokens,
            )
            broken = [
                (metric, scope, limit, used, amount)
                for metric, scope, limit, used, amount in (
                    ("requests", "chat", op_req, used_req, 1),
                    ("requests", "*", tot_req, used_tot_req, 1),
                    ("tokens", "chat", op_tok, used_tok, tokens),
                    ("tokens", "*", tot_tok, used_tot_tok, tokens),
                )
                if limit is not None and used + amount > limit
            ]
            if not broken:
                assert trip is None
            else:
                assert trip is not None
                assert (trip.metric, trip.scope, trip.limit, trip.used, trip.requested) == broken[0]
                assert trip.remaining == max(0, trip.limit - trip.used)


# ── days ──


def test_day_rolls_over_at_midnight_in_a_non_utc_zone() -> None:
    tokyo = ZoneInfo("Asia/Tokyo")  # UTC+9: the day changes at 15:00 UTC
    assert day_of(datetime(2025, 3, 10, 14, 59, 59, tzinfo=UTC), tokyo) == date(2025, 3, 10)
    assert day_of(datetime(2025, 3, 10, 15, 0, tzinfo=UTC), tokyo) == date(2025, 3, 11)
    assert resets_at(date(2025, 3, 10), tokyo) == datetime(2025, 3, 10, 15, 0, tzinfo=UTC)
    assert resets_at(date(2025, 3, 10), tokyo).isoformat() == "2025-03-11T00:00:00+09:00"


def test_a_day_without_midnight_starts_when_the_clock_jumps() -> None:
    santiago = ZoneInfo("America/Santiago")  # 2024-09-08 00:00 -> 01:00
    start = day_start(date(2024, 9, 8), santiago)
    assert start.isoformat() == "2024-09-08T01:00:00-03:00"
    assert day_of(start - timedelta(microseconds=1), santiago) == date(2024, 9, 7)


def test_dst_days_last_23_and_25_hours() -> None:
    london = ZoneInfo("Europe/London")
    spring, autumn = date(2025, 3, 30), date(2025, 10, 26)
    assert resets_at(spring, london) - day_start(spring, london) == timedelta(hours=23)
    assert resets_at(autumn, london) - day_start(autumn, london) == timedelta(hours=25)


def test_naive_clock_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        day_of(datetime(2025, 1, 1), UTC_ZONE)


ZONES = [
    "UTC",
    "Asia/Tokyo",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "Europe/London",
    "Europe/Berlin",
    "America/New_York",
    "America/Santiago",
    "America/Sao_Paulo",
    "Pacific/Chatham",
    "Pacific/Kiritimati",
    "Pacific/Pago_Pago",
]


@given(
    instant=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2037, 12, 31), timezones=st.just(UTC)
    ),
    zone=st.sampled_from(ZONES),
)
def test_every_instant_lies_inside_its_quota_day(instant: datetime, zone: str) -> None:
    tz = ZoneInfo(zone)
    day = day_of(instant, tz)
    assert day_start(day, tz) <= instant < resets_at(day, tz)
    assert day_of(resets_at(day, tz), tz) == day + timedelta(days=1)


# ── the ledger ──


def test_grants_exactly_the_limit_then_reports_the_tripped_limit() -> None:
    led = ledger(book(requests=3))
    for i in range(3):
        led.reserve("acme", "summarize", f"r{i}", 10, 100, NOON)
    with pytest.raises(QuotaExceeded) as caught:
        led.reserve("acme", "summarize", "r3", 10, 100, NOON)
    err = caught.value
    assert (err.code, err.http_status, err.retryable) == ("quota_exceeded", 429, False)
    assert err.details["limit"] == 3
    assert err.details["used"] == 3
    assert err.details["remaining"] == 0
    assert err.details["resets_at"] == datetime(2025, 3, 11, tzinfo=UTC_ZONE)
    assert err.details["limit_name"] == "summarize.requests"
    assert set(err.details) == {"limit", "used", "remaining", "resets_at", "limit_name"}
    # other tenants and other operations have their own counters
    led.reserve("other", "summarize", "r3", 10, 100, NOON)
    led.reserve("acme", "translate", "r4", 10, 100, NOON)


def test_limit_zero_blocks_the_operation() -> None:
    b = book()
    b.set_override("acme", "chat", Override(requests=0))
    with pytest.raises(QuotaExceeded):
        ledger(b).reserve("acme", "chat", "r1", 0, 0, NOON)


def test_token_limit_rejects_a_request_whose_max_tokens_would_overshoot() -> None:
    led = ledger(book(requests=None, tokens=1000))
    led.reserve("acme", "chat", "r1", 100, 500, NOON)  # 600 reserved
    with pytest.raises(QuotaExceeded) as caught:
        led.reserve("acme", "chat", "r2", 100, 301, NOON)  # 600 + 401 > 1000
    details = caught.value.details
    assert (details["limit_name"], details["limit"], details["used"]) == ("chat.tokens", 1000, 600)
    assert details["remaining"] == 400
    assert "401 more requested" in caught.value.message
    led.reserve("acme", "chat", "r3", 100, 300, NOON)  # exactly 1000 fits


def test_total_limit_counts_every_operation() -> None:
    led = ledger(book(requests=None, total=DailyCap(2, None)))
    led.reserve("acme", "chat", "r1", 0, 0, NOON)
    led.reserve("acme", "classify", "r2", 0, 0, NOON)
    with pytest.raises(QuotaExceeded) as caught:
        led.reserve("acme", "summarize", "r3", 0, 0, NOON)
    assert caught.value.details["limit_name"] == "total.requests"


def test_redelivered_request_is_not_charged_twice_even_when_the_quota_is_full() -> None:
    led = ledger(book(requests=1))
    first = led.reserve("acme", "chat", "r1", 10, 90, NOON)
    again = led.reserve("acme", "chat", "r1", 10, 90, NOON)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert led.usage("acme", "chat", NOON) == Usage(1, 100)


def test_settle_replaces_the_budget_by_the_real_count_and_frees_tokens() -> None:
    led = ledger(book(requests=None, tokens=1000))
    res = led.reserve("acme", "chat", "r1", 100, 800, NOON)
    with pytest.raises(QuotaExceeded):
        led.reserve("acme", "chat", "r2", 100, 200, NOON)
    led.settle(res, 100, 50)
    led.settle(res, 100, 50)  # settling twice changes nothing
    assert led.usage("acme", "chat", NOON) == Usage(1, 150)
    led.reserve("acme", "chat", "r2", 100, 200, NOON)


def test_settle_never_raises_a_charge_so_freed_tokens_stay_given_away() -> None:
    led = ledger(book(requests=None, tokens=100))
    first = led.reserve("acme", "chat", "r1", 0, 100, NOON)
    led.settle(first, 0, 10)  # frees 90
    led.reserve("acme", "chat", "r2", 0, 90, NOON)
    again = led.reserve("acme", "chat", "r1", 0, 100, NOON)  # redelivered, runs again
    assert again.duplicate
    led.settle(again, 0, 60)  # generated more the second time: capped at what is charged
    assert led.usage("acme", "chat", NOON) == Usage(2, 100)
    big = led.reserve("acme", "chat", "r3", 0, 0, NOON)
    led.settle(big, 500, 0)  # more input than estimated: capped too
    assert led.usage("acme", "chat", NOON).tokens == 100


def test_settle_after_a_reset_never_goes_negative() -> None:
    b = book(requests=None)
    led = ledger(b)
    res = led.reserve("acme", "chat", "r1", 100, 800, NOON)
    b.set_reset("acme", NOON.date(), "reset-1")
    led.settle(res, 0, 0)
    assert led.usage("acme", "chat", NOON) == Usage(0, 0)
    assert all(u.tokens >= 0 and u.requests >= 0 for u in _all_usage(led))


def test_reset_restarts_todays_counters_but_remembers_charged_requests() -> None:
    b = book(requests=1)
    led = ledger(b)
    led.reserve("acme", "chat", "r1", 0, 0, NOON)
    b.set_reset("acme", NOON.date(), "reset-1")
    assert led.reserve("acme", "chat", "r1", 0, 0, NOON).duplicate
    led.reserve("acme", "chat", "r2", 0, 0, NOON)
    with pytest.raises(QuotaExceeded):
        led.reserve("acme", "chat", "r3", 0, 0, NOON)
    b.set_reset("acme", NOON.date() - timedelta(days=1), "old")  # another day: no effect
    with pytest.raises(QuotaExceeded):
        led.reserve("acme", "chat", "r3", 0, 0, NOON)


def test_quota_is_available_again_after_midnight_in_the_configured_zone() -> None:
    led = ledger(book(requests=1), tz="America/New_York")
    late = datetime(2025, 3, 11, 3, 59, tzinfo=UTC)  # 23:59 EDT on the 10th
    led.reserve("acme", "chat", "r1", 0, 0, late)
    with pytest.raises(QuotaExceeded) as caught:
        led.reserve("acme", "chat", "r2", 0, 0, late)
    assert caught.value.details["resets_at"] == datetime(2025, 3, 11, 4, 0, tzinfo=UTC)
    after = late + timedelta(minutes=1)
    assert not led.reserve("acme", "chat", "r2", 0, 0, after).duplicate


def test_redelivery_across_midnight_is_still_recognised_then_forgotten() -> None:
    led = ledger(book(requests=5))
    led.reserve("acme", "chat", "r1", 0, 0, NOON)
    tomorrow = NOON + timedelta(days=1)
    dup = led.reserve("acme", "chat", "r1", 0, 0, tomorrow)
    assert dup.duplicate and dup.day == NOON.date()
    in_two_days = NOON + timedelta(days=2)
    assert not led.reserve("acme", "chat", "r1", 0, 0, in_two_days).duplicate
    assert {key[1] for key in led.charges()} == {in_two_days.date()}


def test_settle_of_a_day_that_rolled_off_is_ignored() -> None:
    led = ledger()
    res = led.reserve("acme", "chat", "r1", 5, 5, NOON)
    led.reserve("acme", "chat", "r2", 0, 0, NOON + timedelta(days=3))
    led.settle(res, 1, 1)
    assert (res.tenant_id, res.day, res.request_id) not in led.charges()


def test_negative_token_counts_are_refused() -> None:
    led = ledger()
    with pytest.raises(ValueError):
        led.reserve("acme", "chat", "r1", -1, 0, NOON)
    res = led.reserve("acme", "chat", "r1", 0, 0, NOON)
    with pytest.raises(ValueError):
        led.settle(res, 0, -1)


def test_dirty_records_reload_into_the_same_counters() -> None:
    b = book(requests=None)
    led = ledger(b)
    res = led.reserve("acme", "chat", "r1", 10, 100, NOON)
    led.reserve("acme", "summarize", "r2", 20, 200, NOON)
    led.settle(res, 10, 7)
    records = led.take_dirty()
    assert len(records) == 2 and led.dirty_count == 0
    copy = ledger(b)
    for _, _, value in records:
        copy.load(QuotaCharge.model_validate_json(value), NOON)
    assert copy.charges() == led.charges()
    assert copy.usage("acme", "*", NOON) == Usage(2, 237)


def test_old_records_are_not_restored() -> None:
    led = ledger()
    led.reserve("acme", "chat", "r1", 0, 0, NOON)
    (_, _, value), *_ = led.take_dirty()
    later = ledger()
    later.load(QuotaCharge.model_validate_json(value), NOON + timedelta(days=2))
    assert later.charges() == {}


def test_partition_for_tenant_matches_kafkas_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    parts = list(range(12))
    for tenant in ("acme", "globex", "initech", "t-1", "ünïcode"):
        expected = DefaultPartitioner()(tenant.encode(), parts, parts)
        assert partition_for_tenant(tenant, 12) == expected


# ── properties ──


def _charges_of(led: QuotaLedger, res: list[Reservation]) -> list[Charge]:
    charges = led.charges()
    return [charges[(r.tenant_id, r.day, r.request_id)] for r in res]


def _all_usage(led: QuotaLedger) -> list[Usage]:
    return [td.usage(e, s) for td in led for (e, s) in td._usage]


@dataclass(frozen=True)
class Reserve:
    operation: str
    request: int  # repeats are redeliveries
    input_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class Settle:
    which: int
    fraction: float  # of max_tokens really generated


@dataclass(frozen=True)
class Reset:
    n: int


steps_strategy = st.lists(
    st.one_of(
        st.builds(
            Reserve,
            st.sampled_from(["summarize", "chat"]),
            st.integers(0, 12),
            st.integers(0, 40),
            st.integers(0, 60),
        ),
        st.builds(Settle, st.integers(0, 30), st.floats(0, 1)),
        st.builds(Reset, st.integers(0, 3)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    op_requests=st.none() | st.integers(0, 6),
    op_tokens=st.none() | st.integers(0, 200),
    total_requests=st.none() | st.integers(0, 8),
    total_tokens=st.none() | st.integers(0, 300),
    steps=steps_strategy,
)
def test_never_more_than_the_limit_is_granted_and_usage_never_negative(
    op_requests: int | None,
    op_tokens: int | None,
    total_requests: int | None,
    total_tokens: int | None,
    steps: list[Reserve | Settle | Reset],
) -> None:
    b = LimitBook(
        LimitDefaults(
            operation=DailyCap(op_requests, op_tokens),
            total=DailyCap(total_requests, total_tokens),
        )
    )
    led = QuotaLedger(0, b, UTC_ZONE)
    granted: list[tuple[Reservation, Reserve]] = []
    for step in steps:
        if isinstance(step, Reserve):
            try:
                res = led.reserve(
                    "acme",
                    step.operation,
                    f"r{step.request}",
                    step.input_tokens,
                    step.max_tokens,
                    NOON,
                )
            except QuotaExceeded as exc:
                d = exc.details
                amount = (
                    1
                    if d["limit_name"].endswith(".requests")
                    else (step.input_tokens + step.max_tokens)
                )
                assert d["used"] + amount > d["limit"]
                assert d["remaining"] == max(0, d["limit"] - d["used"])
                continue
            if not res.duplicate:
                granted.append((res, step))
        elif isinstance(step, Settle) and granted:
            res, asked = granted[step.which % len(granted)]
            # real counts may even exceed the budget (more input than estimated)
            led.settle(res, asked.input_tokens, int(2 * asked.max_tokens * step.fraction))
        elif isinstance(step, Reset):
            b.set_reset("acme", NOON.date(), f"reset-{step.n}")

        epoch = b.reset_epoch("acme", NOON.date())
        charges = led.charges()
        live = [r for r, _ in granted if charges[("acme", r.day, r.request_id)].epoch == epoch]
        for scope in ("summarize", "chat", "*"):
            cap = b.resolve("acme", scope)
            used = led.usage("acme", scope, NOON)
            assert used.requests == len([r for r in live if scope in ("*", r.operation)])
            if cap.requests is not None:
                assert used.requests <= cap.requests
            if cap.tokens is not None:
                assert used.tokens <= cap.tokens
        assert all(u.tokens >= 0 and u.requests >= 0 for u in _all_usage(led))


@settings(max_examples=200, deadline=None)
@given(
    reserved=st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), min_size=1, max_size=8),
    settles=st.lists(
        st.tuples(st.integers(0, 7), st.integers(0, 500), st.integers(0, 500), st.booleans()),
        max_size=20,
    ),
)
def test_settle_never_goes_negative_and_sums_stay_exact(
    reserved: list[tuple[int, int]], settles: list[tuple[int, int, int, bool]]
) -> None:
    b = book(requests=None)
    led = ledger(b)
    res = [
        led.reserve("acme", "chat", f"r{i}", inp, mx, NOON) for i, (inp, mx) in enumerate(reserved)
    ]
    for n, (index, inp, out, reset_first) in enumerate(settles):
        if reset_first:
            b.set_reset("acme", NOON.date(), f"reset-{n}")
        led.settle(res[index % len(res)], inp, out)
        epoch = b.reset_epoch("acme", NOON.date())
        expected = sum(c.tokens for c in led.charges().values() if c.epoch == epoch)
        assert all(c.tokens <= r.tokens for r, c in zip(res, _charges_of(led, res), strict=True))
        used = led.usage("acme", "chat", NOON)
        assert used.tokens == expected >= 0
        assert used.requests >= 0


# ── which outcomes count ──

NEVER_RAN = ("deadline_exceeded", "overloaded", "cancelled", "internal")


@pytest.mark.parametrize("code", NEVER_RAN)
def test_an_outcome_that_never_ran_the_model_leaves_the_quota_untouched(code: str) -> None:
    led = ledger(book(requests=3, tokens=1000))
    for n in range(4):
        res = led.reserve("acme", "chat", f"gone-{n}", 100, 200, NOON)
        led.settle(res, 0, 0, code, ran=False)
    assert led.usage("acme", "chat", NOON) == Usage(0, 0)
    for n in range(3):
        led.reserve("acme", "chat", f"r{n}", 100, 200, NOON)  # the whole limit is still there
    with pytest.raises(QuotaExceeded):
        led.reserve("acme", "chat", "r3", 0, 0, NOON)


def test_a_cancel_after_it_started_charges_what_it_generated() -> None:
    led = ledger(book(requests=None))
    res = led.reserve("acme", "chat", "r1", 100, 200, NOON)
    led.settle(res, 100, 7, "cancelled", ran=True)
    assert led.usage("acme", "chat", NOON) == Usage(1, 107)


def test_a_released_charge_is_restored_released() -> None:
    b = book(requests=None)
    led = ledger(b)
    res = led.reserve("acme", "chat", "r1", 10, 100, NOON)
    led.settle(res, 0, 0, "overloaded", ran=False)
    copy = ledger(b)
    for _, _, value in led.take_dirty():
        copy.load(QuotaCharge.model_validate_json(value), NOON)
    assert copy.charges() == led.charges()
    assert copy.usage("acme", "*", NOON) == Usage(0, 0)


def test_a_redelivery_that_does_not_run_keeps_the_first_runs_charge() -> None:
    led = ledger(book(requests=None))
    first = led.reserve("acme", "chat", "r1", 10, 100, NOON, origin="t/0/5")
    led.settle(first, 10, 20, "ok")
    again = led.reserve("acme", "chat", "r1", 10, 100, NOON, origin="t/0/5")
    assert again.duplicate
    led.settle(again, 0, 0, "deadline_exceeded", ran=False)  # expired this time
    assert led.usage("acme", "chat", NOON) == Usage(1, 30)
    assert led.charges()[("acme", NOON.date(), "r1")].outcome == "ok"


def test_a_redelivery_of_a_request_that_never_ran_is_charged_when_it_runs() -> None:
    """(One that failed before it ran; one answered overloaded, expired or cancelled is
    answered alike instead: test_request_identity.)"""
    led = ledger(book(requests=1))
    first = led.reserve("acme", "chat", "r1", 10, 100, NOON, origin="t/0/5")
    led.settle(first, 0, 0, "internal", ran=False)
    again = led.reserve("acme", "chat", "r1", 10, 100, NOON, origin="t/0/5")
    assert not again.duplicate  # decided again: nothing of it was charged
    assert led.usage("acme", "chat", NOON) == Usage(1, 110)
    with pytest.raises(QuotaExceeded):
        led.reserve("acme", "chat", "r2", 0, 0, NOON)


@dataclass(frozen=True)
class Ended:
    outcome: str
    ran: bool
    input_tokens: int
    output_tokens: int


OUTCOMES = ("ok", *sorted(HTTP_STATUS))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    op_requests=st.none() | st.integers(0, 6),
    op_tokens=st.none() | st.integers(0, 400),
    requests=st.lists(
        st.tuples(
            st.integers(0, 40),  # reserved input tokens
            st.integers(0, 60),  # max_tokens
            st.none()  # still running
            | st.builds(
                Ended,
                st.sampled_from(OUTCOMES),
                st.booleans(),
                st.integers(0, 80),
                st.integers(0, 120),
            ),
        ),
        max_size=12,
    ),
)
def test_every_outcome_charges_what_ran_and_releases_what_never_ran(
    op_requests: int | None,
    op_tokens: int | None,
    requests: list[tuple[int, int, Ended | None]],
) -> None:
    """Over every outcome code: a request that ran (every "ok", and any failure the model
    worked on) counts one request and its real tokens capped at the reservation; one that
    never ran counts nothing; an unfinished one counts its reservation; limits hold."""
    led = ledger(book(requests=op_requests, tokens=op_tokens))
    expected = Usage()
    for n, (input_tokens, max_tokens, ended) in enumerate(requests):
        try:
            res = led.reserve("acme", "chat", f"r{n}", input_tokens, max_tokens, NOON)
        except QuotaExceeded:
            continue
        reserved = input_tokens + max_tokens
        if ended is None:
            expected.requests += 1
            expected.tokens += reserved
        else:
            led.settle(res, ended.input_tokens, ended.output_tokens, ended.outcome, ran=ended.ran)
            if ended.ran or ended.outcome == "ok":
                expected.requests += 1
                expected.tokens += min(reserved, ended.input_tokens + ended.output_tokens)
        assert led.usage("acme", "chat", NOON) == expected
        assert led.usage("acme", "*", NOON) == expected
        if op_requests is not None:
            assert expected.requests <= op_requests
        if op_tokens is not None:
            assert expected.tokens <= op_tokens
    charges = led.charges().values()
    assert all(c.counted or (c.tokens == 0 and c.settled) for c in charges)

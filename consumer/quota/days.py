"""Quota days: which day an instant falls on in the configured zone, and when it ends (pure)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo


def day_of(now: datetime, tz: tzinfo) -> date:
    """The quota day an instant falls on in `tz`."""
    if now.tzinfo is None:
        raise ValueError("quota clock must return timezone-aware datetimes")
    return now.astimezone(tz).date()


def day_start(day: date, tz: tzinfo) -> datetime:
    """The first instant of `day` in `tz` (after the gap when midnight does not exist).

    Carries a fixed UTC offset rather than `tz`: Python compares and subtracts datetimes
    that share a tzinfo by wall clock, which is wrong across a DST change.
    """
    # A round trip through UTC moves a non-existent local midnight (DST gap) to the
    # wall-clock time at which the day really begins.
    local = datetime.combine(day, time(), tzinfo=tz).astimezone(UTC).astimezone(tz)
    offset = local.utcoffset()
    assert offset is not None  # tz is a real zone
    return local.astimezone(timezone(offset))


def resets_at(day: date, tz: tzinfo) -> datetime:
    """When the counters of `day` stop applying: the start of the next day in `tz`."""
    return day_start(day + timedelta(days=1), tz)

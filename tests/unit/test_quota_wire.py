"""Quota wire models, settings parsing and applying control records, without a broker."""

from __future__ import annotations

from datetime import date

import pytest
from pydantic import ValidationError

from consumer.quota import LimitBook, QuotaSettings, apply_control_record
from consumer.quota.limit_book import limit_defaults
from schemas.quota import (
    QuotaCharge,
    ResetUsage,
    SetLimits,
    UpdateLimitRequest,
    charge_key,
    limits_key,
    parse_key,
    reset_key,
)


def test_settings_read_unlimited_from_strings() -> None:
    s = QuotaSettings.model_validate(
        {"default_daily_requests": "unlimited", "total_daily_tokens": "5000"}
    )
    assert (s.default_daily_requests, s.total_daily_tokens) == (None, 5000)
    with pytest.raises(ValidationError):
        QuotaSettings.model_validate({"default_daily_requests": -1})
    with pytest.raises(ValidationError):
        QuotaSettings.model_validate({"state_retention_ms": 3_600_000})  # shorter than a day


def test_commands_are_strict() -> None:
    with pytest.raises(ValidationError):
        SetLimits.model_validate({"tenant_id": "acme", "operation": "chat", "surprise": 1})
    with pytest.raises(ValidationError):
        SetLimits.model_validate({"tenant_id": "acme", "operation": "dance"})
    with pytest.raises(ValidationError):
        ResetUsage(tenant_id="*", day=date(2025, 1, 1), reset_id="x")  # one tenant only
    assert SetLimits(tenant_id="*", operation="*", daily_tokens="unlimited").daily_requests is None
    with pytest.raises(ValidationError):
        UpdateLimitRequest.model_validate({"operation": "chat", "daily_limit": -5})


def test_keys_round_trip_and_foreign_keys_are_not_ours() -> None:
    assert parse_key(limits_key("a/b", "chat")) == ("quota.limits", "a/b", "chat")
    assert parse_key(reset_key("acme", date(2025, 1, 2))) == ("quota.reset", "acme", "2025-01-02")
    assert parse_key(charge_key("acme", date(2025, 1, 2), "r")) is not None
    for foreign in (None, b"", b"plain", b'{"a": 1}', b'["other", "x"]', b"[1, 2]"):
        assert parse_key(foreign) is None


def test_control_records_apply_and_tombstones_delete() -> None:
    book = LimitBook(limit_defaults(QuotaSettings()))
    command = SetLimits(tenant_id="acme", operation="chat", daily_requests=5)
    value = command.model_dump_json().encode()
    assert apply_control_record(book, limits_key("acme", "chat"), value)
    assert book.resolve("acme", "chat").requests == 5
    assert apply_control_record(book, limits_key("acme", "chat"), None)
    assert book.resolve("acme", "chat").requests == 1000
    assert not apply_control_record(book, b"other-key", b"{}")
    assert not apply_control_record(book, limits_key("acme", "chat"), b'{"kind": "nope"}')


def test_charge_records_are_strict() -> None:
    with pytest.raises(ValidationError):
        QuotaCharge.model_validate(
            {
                "tenant_id": "acme",
                "day": "2025-01-01",
                "request_id": "r",
                "operation": "chat",
                "tokens": -1,
                "settled": False,
                "charged_at": "2025-01-01T00:00:00Z",
            }
        )


def test_offset_clock_moves_the_quota_day() -> None:
    from datetime import UTC, datetime, timedelta

    from consumer.quota import offset_clock, utc_now

    assert offset_clock(0) is utc_now
    shifted = offset_clock(86_400)()
    assert shifted - datetime.now(UTC) > timedelta(hours=23, minutes=59)

"""UsageRow: one row per outcome, UTC timestamps, counts only — never text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from consumer.usage.segments import COLUMN_NAMES, row_values, rows_to_arrow, usage_arrow_schema
from schemas.usage import USAGE_COLUMNS, UsageRow, usage_column_types

T0 = datetime(2025, 3, 4, 10, 15, tzinfo=UTC)


def row_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "tenant_id": "acme",
        "operation": "summarize",
        "model": "qwen2.5-7b",
        "status": "ok",
        "error_code": None,
        "input_chars": 1200,
        "input_tokens": 300,
        "output_tokens": 80,
        "queue_ms": 3.5,
        "execution_ms": 410.0,
        "total_ms": 415.2,
        "request_id": "req-1",
        "correlation_id": "corr-1",
        "kafka_topic": "ops.requests.v1",
        "kafka_partition": 3,
        "kafka_offset": 42,
        "instance_id": "host-1",
        "received_at": T0,
        "finished_at": T0 + timedelta(milliseconds=415),
    }
    fields.update(overrides)
    return fields


def test_ok_row_is_valid() -> None:
    row = UsageRow(**row_fields())
    assert row.status == "ok" and row.input_tokens == 300


@pytest.mark.parametrize(
    "overrides",
    [
        {"status": "error", "error_code": "quota_exceeded", "model": None, "output_tokens": None},
        {"status": "error", "error_code": "unauthorized", "model": None, "input_tokens": None},
        {"status": "error", "error_code": "deadline_exceeded", "execution_ms": None},
        {
            "status": "error",
            "error_code": "validation",
            "tenant_id": None,
            "operation": None,
            "model": None,
            "request_id": None,
            "correlation_id": None,
            "input_chars": None,
            "input_tokens": None,
            "output_tokens": None,
            "queue_ms": None,
            "execution_ms": None,
        },
    ],
    ids=["quota_exceeded", "unauthorized", "deadline_exceeded", "dead_lettered"],
)
def test_error_outcomes_allow_their_nulls(overrides: dict[str, Any]) -> None:
    row = UsageRow(**row_fields(**overrides))
    assert row.status == "error"


def test_naive_timestamp_is_rejected() -> None:
    with pytest.raises(ValidationError, match="timezone-aware"):
        UsageRow(**row_fields(received_at=datetime(2025, 3, 4, 10, 15)))


def test_timestamps_are_converted_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    row = UsageRow(
        **row_fields(
            received_at=datetime(2025, 3, 4, 12, 15, tzinfo=plus_two),
            finished_at=datetime(2025, 3, 4, 12, 16, tzinfo=plus_two),
        )
    )
    assert row.received_at == T0
    assert row.received_at.utcoffset() == timedelta(0)
    assert row.received_at.hour == 10


@pytest.mark.parametrize("field", ["prompt", "completion", "text", "messages"])
def test_text_fields_are_rejected(field: str) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        UsageRow(**row_fields(**{field: "Summarize this confidential memo"}))


def test_identifier_cannot_carry_a_prompt() -> None:
    with pytest.raises(ValidationError):
        UsageRow(**row_fields(request_id="x" * 10_000))


def test_ok_row_with_error_code_is_rejected() -> None:
    with pytest.raises(ValidationError, match="no error_code"):
        UsageRow(**row_fields(error_code="internal"))


def test_error_row_without_code_is_rejected() -> None:
    with pytest.raises(ValidationError, match="needs an error_code"):
        UsageRow(**row_fields(status="error"))


def test_error_code_is_a_code_not_a_message() -> None:
    with pytest.raises(ValidationError):
        UsageRow(**row_fields(status="error", error_code="Quota exceeded for tenant acme"))


def test_finished_before_received_is_rejected() -> None:
    with pytest.raises(ValidationError, match="before received_at"):
        UsageRow(**row_fields(finished_at=T0 - timedelta(seconds=1)))


def test_negative_counts_are_rejected() -> None:
    with pytest.raises(ValidationError):
        UsageRow(**row_fields(output_tokens=-1))


def test_storage_columns_are_exactly_the_model_fields_in_order() -> None:
    assert [name for name, _ in USAGE_COLUMNS] == list(UsageRow.model_fields)
    assert list(usage_column_types()) == list(UsageRow.model_fields)
    assert usage_arrow_schema().names == list(COLUMN_NAMES)


def test_row_values_follow_the_storage_order() -> None:
    row = UsageRow(**row_fields())
    assert row_values(row) == tuple(getattr(row, name) for name in COLUMN_NAMES)


def test_arrow_conversion_keeps_every_value_across_chunks() -> None:
    rows = [
        row_values(UsageRow(**row_fields(request_id=f"r{i}", kafka_offset=i, output_tokens=None)))
        for i in range(5_000)
    ]
    table = rows_to_arrow(rows)
    assert table.num_rows == 5_000
    assert table.schema == usage_arrow_schema()
    assert table.column("kafka_offset").to_pylist() == list(range(5_000))
    assert table.column("request_id")[4_999].as_py() == "r4999"
    assert table.column("output_tokens").null_count == 5_000
    assert table.column("received_at").type.tz == "UTC"


def test_empty_batch_converts_to_an_empty_table() -> None:
    assert rows_to_arrow([]).num_rows == 0

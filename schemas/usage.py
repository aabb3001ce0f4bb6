"""The usage row: one per consumed request, whatever its outcome; counts and timings, never text."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Identifiers are bounded so that a row can never smuggle a prompt or a completion.
Identifier = Annotated[str, Field(min_length=1, max_length=256)]
ErrorCode = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Count = Annotated[int, Field(ge=0)]
Millis = Annotated[float, Field(ge=0)]

UsageStatus = Literal["ok", "error"]


class UsageRow(BaseModel):
    """What one request cost and how it ended: written to Parquet, queried by analysts.

    Outcome-specific fields are null where the outcome never reached them: a
    message that could not be decoded (dead-lettered) has no tenant, operation
    or request id; a rejected request has no model, tokens or execution time.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: Identifier | None
    operation: Identifier | None
    model: Identifier | None
    status: UsageStatus
    error_code: ErrorCode | None = None
    input_chars: Count | None = None
    input_tokens: Count | None = None
    output_tokens: Count | None = None
    queue_ms: Millis | None = None
    execution_ms: Millis | None = None
    total_ms: Millis
    request_id: Identifier | None
    correlation_id: Identifier | None
    kafka_topic: Identifier
    kafka_partition: Annotated[int, Field(ge=0)]
    kafka_offset: Annotated[int, Field(ge=0)]
    instance_id: Identifier
    received_at: datetime
    finished_at: datetime
    # The stages of the request's life, as reply `meta` names them (null in rows written
    # before they existed, and where a request never reached the stage).
    bus_ms: Millis | None = None
    admission_ms: Millis | None = None
    slot_wait_ms: Millis | None = None
    prefill_ms: Millis | None = None
    generation_ms: Millis | None = None
    # True: answered with the stored reply of an earlier record (a retry), nothing run or
    # charged; its tokens are 0 so no sum doubles (null in rows written before).
    replayed: bool | None = None

    @field_validator("received_at", "finished_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("timestamp must be timezone-aware")
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _outcome_is_consistent(self) -> UsageRow:
        if self.status == "ok" and self.error_code is not None:
            raise ValueError("an ok row has no error_code")
        if self.status == "error" and self.error_code is None:
            raise ValueError("an error row needs an error_code")
        if self.finished_at < self.received_at:
            raise ValueError("finished_at is before received_at")
        return self


# Column order and storage types of a usage row, as DuckDB names them. The Parquet
# segments are written with exactly these; the Arrow schema is derived from them.
USAGE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("tenant_id", "VARCHAR"),
    ("operation", "VARCHAR"),
    ("model", "VARCHAR"),
    ("status", "VARCHAR"),
    ("error_code", "VARCHAR"),
    ("input_chars", "BIGINT"),
    ("input_tokens", "BIGINT"),
    ("output_tokens", "BIGINT"),
    ("queue_ms", "DOUBLE"),
    ("execution_ms", "DOUBLE"),
    ("total_ms", "DOUBLE"),
    ("request_id", "VARCHAR"),
    ("correlation_id", "VARCHAR"),
    ("kafka_topic", "VARCHAR"),
    ("kafka_partition", "INTEGER"),
    ("kafka_offset", "BIGINT"),
    ("instance_id", "VARCHAR"),
    ("received_at", "TIMESTAMP WITH TIME ZONE"),
    ("finished_at", "TIMESTAMP WITH TIME ZONE"),
    # Added later: older segments lack them (the catalog reads both, by name).
    ("bus_ms", "DOUBLE"),
    ("admission_ms", "DOUBLE"),
    ("slot_wait_ms", "DOUBLE"),
    ("prefill_ms", "DOUBLE"),
    ("generation_ms", "DOUBLE"),
    ("replayed", "BOOLEAN"),
)


def usage_column_types() -> dict[str, str]:
    """Column name → DuckDB type of a usage row, in storage order."""
    return dict(USAGE_COLUMNS)

"""The usage row of one processed record, built from the pipeline's `Outcome`."""

from __future__ import annotations

from datetime import UTC, datetime

from consumer.pipeline.outcome import Outcome
from schemas.usage import UsageRow

IDENTIFIER_MAX_CHARS = 256  # schemas.usage.Identifier


def usage_row(outcome: Outcome, instance_id: str) -> UsageRow:
    """Counts and timings of `outcome` (never text); a dead letter is an `error` row `dlq`."""
    record = outcome.record
    received = datetime.fromtimestamp(record.received_at, UTC)
    finished = datetime.fromtimestamp(max(outcome.finished_at, record.received_at), UTC)
    ok = outcome.status == "ok"
    error_code = None if ok else ("dlq" if outcome.status == "dlq" else outcome.error_code)
    return UsageRow(
        tenant_id=outcome.tenant_id,
        operation=outcome.operation,
        model=outcome.model,
        status="ok" if ok else "error",
        error_code=error_code or ("internal" if not ok else None),
        input_chars=outcome.input_chars,
        input_tokens=outcome.input_tokens,
        output_tokens=outcome.output_tokens,
        queue_ms=outcome.queue_ms,
        execution_ms=outcome.execution_ms,
        total_ms=max(0.0, (finished - received).total_seconds() * 1000 + outcome.queue_ms),
        request_id=_identifier(outcome.request_id),
        correlation_id=_identifier(outcome.correlation_id),
        kafka_topic=record.topic,
        kafka_partition=record.partition,
        kafka_offset=record.offset,
        instance_id=instance_id,
        received_at=received,
        finished_at=finished,
    )


def _identifier(value: str | None) -> str | None:
    # A correlation id comes from a header of any length (and a request id may fall back to
    # it); a row that fails validation would be retried forever and block its partition.
    return value if value is not None and 0 < len(value) <= IDENTIFIER_MAX_CHARS else None

"""The usage row of one processed record, built from the pipeline's `Outcome`."""

from __future__ import annotations

from datetime import UTC, datetime

from consumer.pipeline.outcome import Outcome
from schemas.usage import UsageRow

IDENTIFIER_MAX_CHARS = 256  # schemas.usage.Identifier


def usage_row(outcome: Outcome, instance_id: str) -> UsageRow:
    """Counts and timings of `outcome` (never text), status and code from its `ending`."""
    record = outcome.record
    received = datetime.fromtimestamp(record.received_at, UTC)
    finished = datetime.fromtimestamp(max(outcome.finished_at, record.received_at), UTC)
    ending = outcome.ending
    stages = outcome.stages
    fields = stages.as_fields()
    return UsageRow(
        tenant_id=outcome.tenant_id,
        operation=outcome.operation,
        model=outcome.model,
        status="ok" if ending.status == "ok" else "error",
        error_code=ending.code,
        input_chars=outcome.input_chars,
        input_tokens=outcome.input_tokens,
        output_tokens=outcome.output_tokens,
        queue_ms=round(stages.queue_ms, 3),
        execution_ms=round(stages.execution_ms, 3),
        total_ms=round(stages.total_ms, 3),
        bus_ms=fields["bus_ms"],
        admission_ms=fields["admission_ms"],
        slot_wait_ms=fields["slot_wait_ms"],
        prefill_ms=fields["prefill_ms"],
        generation_ms=fields["generation_ms"],
        replayed=outcome.replayed,
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

"""Pure pieces of the app's wiring: the in-flight bound and the usage row of an outcome."""

from __future__ import annotations

import time

import pytest

from consumer.bus.records import InboundRecord
from consumer.engine.scheduler.policy import Load
from consumer.intake.sizing import in_flight_bound
from consumer.pipeline.outcome import Outcome, Stages
from consumer.usage.rows import usage_row


def _load(slots: int, queue_limit: int) -> Load:
    idle = {"interactive": 0, "batch": 0}
    return Load(dict(idle), dict(idle), running=0, slots=slots, queue_limit=queue_limit)


@pytest.mark.parametrize(
    ("configured", "slots", "queue_limit", "expected"),
    [
        (None, 8, 32, 80),  # twice the scheduler's slots + queue: a flood reaches overloaded
        (None, 16, 64, 160),
        (7, 16, 64, 7),  # an explicit setting wins
    ],
)
def test_in_flight_bound_follows_the_schedulers_capacity(
    configured: int | None, slots: int, queue_limit: int, expected: int
) -> None:
    assert in_flight_bound(configured, _load(slots, queue_limit)) == expected


def _record() -> InboundRecord:
    now = time.time()
    return InboundRecord(
        topic="ops.requests.v1",
        partition=3,
        offset=42,
        key=b"t1",
        value=b"{}",
        headers=(),
        timestamp_ms=int(now * 1000) - 20,
        received_at=now,
    )


def test_ok_outcome_becomes_an_ok_row_without_error_code() -> None:
    record = _record()
    outcome = Outcome(
        record=record,
        status="ok",
        tenant_id="t1",
        operation="summarize",
        request_id="r1",
        model="m",
        input_tokens=10,
        output_tokens=5,
        stages=Stages(bus_ms=20.0),
    )
    outcome.finish(record.received_at + 0.5)
    row = usage_row(outcome, "i1")
    assert (row.status, row.error_code) == ("ok", None)
    assert (row.kafka_partition, row.kafka_offset, row.instance_id) == (3, 42, "i1")
    # From the fetch to the reply; the 20 ms on the bus before is its own column.
    assert row.total_ms == pytest.approx(500.0, abs=1.0)
    assert row.bus_ms == pytest.approx(20.0)


def test_dead_letter_outcome_is_an_error_row_coded_dlq() -> None:
    record = _record()
    outcome = Outcome(record=record, status="dlq", error_code="validation")
    outcome.finished_at = record.received_at
    row = usage_row(outcome, "i1")
    assert (row.status, row.error_code, row.tenant_id, row.request_id) == (
        "error",
        "dlq",
        None,
        None,
    )


def test_error_outcome_keeps_its_code() -> None:
    record = _record()
    outcome = Outcome(record=record, status="error", error_code="quota_exceeded", tenant_id="t")
    outcome.finished_at = record.received_at + 0.01
    assert usage_row(outcome, "i1").error_code == "quota_exceeded"


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--help"],
        ["dev", "--help"],
        ["topics", "ensure", "--help"],
        ["request", "summarize", "--help"],
        ["schema", "--help"],
        ["limits", "show", "--help"],
        ["usage", "report", "--help"],
        ["keys", "new", "--help"],
    ],
)
def test_every_subcommand_is_on_the_command_line(argv: list[str]) -> None:
    from consumer.cli.main import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 0

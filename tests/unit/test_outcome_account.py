"""One account of how a record ended: every kind of outcome, fed through the pipeline, says
the same status, code and timings in its reply, usage row, metric and console line."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer.auth.keys import KeyRing, TenantKey
from consumer.bus.records import InboundRecord
from consumer.engine.base import EngineError, EngineOverloaded, WorkCancelled, WorkExpired
from consumer.observability.console import log_request_finished
from consumer.observability.telemetry import Telemetry, TelemetrySettings
from consumer.pipeline import RequestProcessor
from consumer.pipeline.outcome import Outcome
from consumer.usage.rows import usage_row
from schemas.replies import OperationReply
from tests.support.fake_engine import FakeEngine
from tests.support.waiting import wait_until
from tests.unit.test_pipeline import (
    BODIES,
    TOPICS,
    MemoryPublisher,
    foreign_partition,
    keyed,
    quota_processor,
)

Step = Callable[[RequestProcessor], Awaitable[InboundRecord]]


@dataclass
class Account:
    """What each of the four reports said about the last record."""

    outcome: Outcome
    reply: OperationReply | None
    row: dict[str, object] | None
    metric: dict[str, str]
    line: dict[str, object] | None


def chat(request_id: str, **extra: object) -> dict[str, object]:
    return {**BODIES["chat"], "request_id": request_id, **extra}


async def run_case(
    caplog: pytest.LogCaptureFixture,
    last: Callable[[], InboundRecord],
    *,
    before: tuple[InboundRecord, ...] = (),
    engine_failure: Exception | None = None,
    requests_per_day: int = 10,
    signed: bool = False,
) -> Account:
    processor, publisher = quota_processor(requests_per_day=requests_per_day)
    for record in before:
        await processor.process(record)
    if signed:
        secret = "acme-secret-0123456789abcdef"
        processor._keyring = KeyRing({"acme": [TenantKey(key_id="acme-1", secret=secret)]})
    engine = processor._engine
    assert isinstance(engine, FakeEngine)
    if engine_failure is not None:
        engine.raise_next = engine_failure  # type: ignore[assignment]
    return await run_case_on(processor, publisher, caplog, last())


async def run_case_on(
    processor: RequestProcessor,
    publisher: MemoryPublisher,
    caplog: pytest.LogCaptureFixture,
    last: InboundRecord,
) -> Account:
    telemetry = Telemetry(TelemetrySettings(), instance_id="unit-account")
    processor._telemetry = telemetry  # counted from here on: the last record only
    processor._tracer = telemetry.tracer
    sent_before = len(publisher.to(TOPICS.replies))
    caplog.set_level(logging.INFO)
    caplog.clear()
    outcome = await processor.process(last)
    log_request_finished(outcome)
    replies = publisher.to(TOPICS.replies)[sent_before:]
    reply = OperationReply.model_validate_json(replies[-1].value) if replies else None
    row = usage_row(outcome, "unit").model_dump() if outcome.leaves_usage_row else None
    lines = [r for r in caplog.records if r.getMessage() == "request_finished"]
    line = (
        {k: getattr(lines[0], k, None) for k in ("status", "code", "total_ms")} if lines else None
    )
    metric = _one_request_series(telemetry)
    telemetry.shutdown()
    return Account(outcome, reply, row, metric, line)


def _one_request_series(telemetry: Telemetry) -> dict[str, str]:
    series = [
        sample.labels
        for family in text_string_to_metric_families(telemetry.prometheus_text().decode())
        for sample in family.samples
        if sample.name == "opstream_requests_total" and sample.value == 1
    ]
    assert len(series) == 1, series
    return series[0]


def assert_one_account(account: Account, kind: str, code: str | None) -> None:
    """Reply, row, metric and line agree with the outcome's ending, and with `kind`/`code`."""
    ending = account.outcome.ending
    assert (ending.kind, ending.code) == (kind, code)
    assert (account.metric["status"], account.metric["code"] or None) == (
        ending.metric_status,
        code,
    )
    if kind in ("forwarded", "repeat"):
        assert account.row is None and account.line is None and account.reply is None
        return
    assert account.row is not None and account.line is not None
    assert (account.row["status"], account.row["error_code"]) == (ending.status, code)
    assert (account.line["status"], account.line["code"]) == (ending.status, code)
    assert account.line["total_ms"] == round(float(account.row["total_ms"]))  # type: ignore[arg-type]
    if account.reply is None:
        assert kind == "dlq"  # a dead letter without an allowed reply route gets none
        return
    assert account.reply.status == ending.status
    reply_code = account.reply.error.code if account.reply.error else None
    # The wire has no `dlq` code: a dead letter that could be answered says `validation`.
    assert reply_code == ("validation" if kind == "dlq" else code)
    meta = account.reply.meta
    if kind == "replay":
        # The original's reply, verbatim but for the mark: its meta is the original's.
        assert meta.replayed is True and account.row["replayed"] is True
        return
    assert meta.total_ms == account.row["total_ms"]
    assert meta.queue_ms == account.row["queue_ms"]
    assert meta.execution_time_ms == account.row["execution_ms"]
    for stage in ("bus_ms", "admission_ms", "slot_wait_ms", "prefill_ms", "generation_ms"):
        assert getattr(meta, stage) == account.row[stage], stage


async def test_ok(caplog: pytest.LogCaptureFixture) -> None:
    account = await run_case(caplog, lambda: keyed("acme", chat("ok")))
    assert_one_account(account, "ok", None)
    assert account.row is not None and account.row["generation_ms"] is not None


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (WorkExpired("the deadline passed in the queue"), "deadline_exceeded"),
        (EngineOverloaded("the queue is full"), "overloaded"),
        (WorkCancelled("some", 12, 3), "cancelled"),
        (EngineError("the backend failed", retryable=True), "internal"),
    ],
)
async def test_engine_outcomes(
    caplog: pytest.LogCaptureFixture, failure: Exception, code: str
) -> None:
    account = await run_case(caplog, lambda: keyed("acme", chat("e")), engine_failure=failure)
    assert_one_account(account, "error", code)


async def test_validation(caplog: pytest.LogCaptureFixture) -> None:
    account = await run_case(caplog, lambda: keyed("acme", {"operation": "chat"}))
    assert_one_account(account, "error", "validation")


async def test_unauthorized(caplog: pytest.LogCaptureFixture) -> None:
    account = await run_case(caplog, lambda: keyed("acme", chat("u")), signed=True)
    assert_one_account(account, "error", "unauthorized")


async def test_quota_exceeded(caplog: pytest.LogCaptureFixture) -> None:
    account = await run_case(
        caplog, lambda: keyed("acme", chat("q2")), before=(keyed("acme", chat("q1")),),
        requests_per_day=1,
    )  # fmt: skip
    assert_one_account(account, "error", "quota_exceeded")


async def test_duplicate_request(caplog: pytest.LogCaptureFixture) -> None:
    other = chat("d", messages=[{"role": "user", "content": "something else"}])
    account = await run_case(
        caplog, lambda: keyed("acme", other), before=(keyed("acme", chat("d")),)
    )
    assert_one_account(account, "error", "duplicate_request")


async def test_dead_letter_answered_validation(caplog: pytest.LogCaptureFixture) -> None:
    def undecodable() -> InboundRecord:
        record = keyed("acme", chat("x"))
        return InboundRecord(**{**{f: getattr(record, f) for f in record.__slots__}, "value": b"{"})

    account = await run_case(caplog, undecodable)
    assert_one_account(account, "dlq", "dlq")
    assert account.reply is not None  # it had a correlation id and the default reply topic


async def test_dead_letter_without_reply(caplog: pytest.LogCaptureFixture) -> None:
    from schemas.headers import CORRELATION_ID, REPLY_TO

    headers = ((CORRELATION_ID, b"c"), (REPLY_TO, b"ops.control.v1"))
    account = await run_case(caplog, lambda: keyed("acme", chat("y"), headers=headers))
    assert_one_account(account, "dlq", "dlq")


async def test_forwarded(caplog: pytest.LogCaptureFixture) -> None:
    account = await run_case(
        caplog, lambda: keyed("acme", chat("f"), partition=foreign_partition("acme"))
    )
    assert_one_account(account, "forwarded", None)


async def test_verbatim_copy_of_a_finished_request_is_a_replay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = keyed("acme", chat("v"))
    copy = InboundRecord(**{**{f: getattr(first, f) for f in first.__slots__}, "offset": 10**6})
    account = await run_case(caplog, lambda: copy, before=(first,))
    assert_one_account(account, "replay", None)


async def test_retry_of_a_finished_request_is_a_replay(caplog: pytest.LogCaptureFixture) -> None:
    from schemas.headers import CORRELATION_ID

    retry = keyed("acme", chat("rp"), headers=((CORRELATION_ID, b"c-retry"),))
    account = await run_case(caplog, lambda: retry, before=(keyed("acme", chat("rp")),))
    assert_one_account(account, "replay", None)


async def test_verbatim_copy_of_a_running_request_and_a_retry_of_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the original runs: its verbatim copy is a `repeat` (the original's reply answers
    it), a retry under another correlation id is answered `in_progress`."""
    from schemas.headers import CORRELATION_ID

    processor, publisher = quota_processor()
    engine = processor._engine
    assert isinstance(engine, FakeEngine)
    engine.hold = asyncio.Event()
    first = keyed("acme", chat("running"))
    running = asyncio.create_task(processor.process(first))
    await wait_until(lambda: engine._running, what="generation started")
    copy = InboundRecord(**{**{f: getattr(first, f) for f in first.__slots__}, "offset": 10**7})
    retry = keyed("acme", chat("running"), headers=((CORRELATION_ID, b"c-retry"),))
    accounts = []
    for record in (copy, retry):
        accounts.append(await run_case_on(processor, publisher, caplog, record))
    engine.hold.set()
    await running
    assert_one_account(accounts[0], "repeat", None)
    assert_one_account(accounts[1], "error", "in_progress")


async def test_cancel_request(caplog: pytest.LogCaptureFixture) -> None:
    body = {"operation": "cancel", "request_id": "nothing-open"}
    account = await run_case(caplog, lambda: keyed("acme", body))
    assert_one_account(account, "ok", None)


async def test_incomplete_output(caplog: pytest.LogCaptureFixture) -> None:
    # The fake engine writes words, never the JSON an extract's schema asks for.
    body = {"operation": "extract", "tenant_id": "tenant-a", "request_id": "cut", "text": "x",
            "schema": {"type": "object"}}  # fmt: skip
    account = await run_case(caplog, lambda: keyed("acme", body))
    assert_one_account(account, "error", "incomplete_output")
    assert account.reply is not None and account.reply.meta.output_tokens > 0  # it ran: charged


def test_every_kind_is_covered() -> None:
    # ok, each error code of the wire, dlq, forwarded, repeat, replay: each has a case above.
    from typing import get_args

    from schemas.replies import ErrorCode

    covered = {"validation", "unauthorized", "duplicate_request", "quota_exceeded"}
    covered |= {"deadline_exceeded", "overloaded", "cancelled", "internal", "in_progress"}
    covered |= {"incomplete_output"}
    assert covered == set(get_args(ErrorCode))

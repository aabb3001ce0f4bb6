"""Stored answers (Stripe-style idempotency): a retry of a finished request — same tenant,
request_id and body, any other record — gets the original reply, marked replayed, and is
neither run nor charged again; the answer survives a restore from the state topic."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from consumer.bus.records import InboundRecord
from consumer.engine.base import EngineError
from consumer.pipeline import RequestProcessor
from consumer.quota.ledger import QuotaLedger
from consumer.quota.store import QuotaStore
from consumer.usage.rows import usage_row
from schemas.headers import CORRELATION_ID, REPLAYED
from schemas.quota import QuotaCharge
from schemas.replies import OperationReply
from tests.support.fake_engine import FakeEngine
from tests.support.waiting import wait_until
from tests.unit.test_pipeline import BODIES, TOPICS, MemoryPublisher, keyed, quota_processor


def chat(request_id: str, **extra: object) -> dict[str, object]:
    return {**BODIES["chat"], "request_id": request_id, **extra}


def replies(publisher: MemoryPublisher) -> list[tuple[str, OperationReply, dict[str, str]]]:
    return [
        (s.headers[CORRELATION_ID], OperationReply.model_validate_json(s.value), s.headers)
        for s in publisher.to(TOPICS.replies)
    ]


def engine_of(processor: RequestProcessor) -> FakeEngine:
    engine = processor._engine
    assert isinstance(engine, FakeEngine)
    return engine


def store_of(processor: RequestProcessor) -> QuotaStore:
    assert processor._quota is not None
    return processor._quota


def requests_used(processor: RequestProcessor, tenant: str = "acme") -> int:
    store = store_of(processor)
    return sum(
        ledger.usage(tenant, "chat", datetime.now(UTC)).requests
        for ledger in store._ledgers.values()
    )


def cid(correlation: str) -> tuple[tuple[str, bytes], ...]:
    return ((CORRELATION_ID, correlation.encode()),)


async def test_a_retry_with_the_same_body_gets_the_original_reply_replayed() -> None:
    processor, publisher = quota_processor()
    first = await processor.process(keyed("acme", chat("r-1"), headers=cid("c-1")))
    retry = await processor.process(
        keyed("acme", chat("r-1", timeout_ms=60_000), headers=cid("c-2"))
    )
    (c1, original, h1), (c2, replayed, h2) = replies(publisher)
    assert (c1, c2) == ("c-1", "c-2")  # each to its own correlation id
    assert replayed.result == original.result and replayed.status == "ok"
    assert replayed.meta.replayed is True and original.meta.replayed is None
    assert replayed.meta.model_dump(exclude={"replayed"}) == original.meta.model_dump(
        exclude={"replayed"}
    )
    assert h2.get(REPLAYED) == "true" and REPLAYED not in h1
    assert engine_of(processor).calls == 1  # not run again
    assert requests_used(processor) == 1  # not charged again
    original_row, replay_row = usage_row(first, "u"), usage_row(retry, "u")
    assert (original_row.replayed, replay_row.replayed) == (False, True)
    assert (replay_row.status, replay_row.input_tokens, replay_row.output_tokens) == ("ok", 0, 0)
    assert retry.ending.kind == "replay" and retry.ending.metric_status == "replay"


async def test_a_verbatim_copy_at_another_offset_is_answered_with_the_stored_reply() -> None:
    processor, publisher = quota_processor()
    first = keyed("acme", chat("r-v"))
    await processor.process(first)
    copy = InboundRecord(**{**{f: getattr(first, f) for f in first.__slots__}, "offset": 99_999})
    outcome = await processor.process(copy)
    assert outcome.replayed
    assert [r.meta.replayed for _, r, _ in replies(publisher)] == [None, True]
    assert engine_of(processor).calls == 1


async def test_another_body_under_a_used_id_is_still_a_duplicate_request() -> None:
    processor, _publisher = quota_processor()
    await processor.process(keyed("acme", chat("r-d")))
    other = chat("r-d", messages=[{"role": "user", "content": "something else"}])
    outcome = await processor.process(keyed("acme", other, headers=cid("c-other")))
    assert outcome.error_code == "duplicate_request" and not outcome.replayed
    assert engine_of(processor).calls == 1


async def test_a_retry_while_the_original_runs_is_told_to_retry_and_never_runs_twice() -> None:
    processor, publisher = quota_processor()
    engine = engine_of(processor)
    engine.hold = asyncio.Event()
    running = asyncio.create_task(
        processor.process(keyed("acme", chat("r-run"), headers=cid("c-1")))
    )
    await wait_until(lambda: engine._running, what="generation started")
    early = await processor.process(keyed("acme", chat("r-run"), headers=cid("c-2")))
    assert early.error_code == "in_progress"
    (_, busy, _) = replies(publisher)[-1]
    assert busy.error is not None and busy.error.retryable and busy.error.http_status == 409
    engine.hold.set()
    assert (await running).status == "ok"
    late = await processor.process(keyed("acme", chat("r-run"), headers=cid("c-3")))
    assert late.replayed and engine.calls == 1


async def test_a_retryable_failure_is_not_stored_and_the_retry_runs() -> None:
    processor, _publisher = quota_processor()
    engine_of(processor).raise_next = EngineError("backend failed", retryable=True)  # type: ignore[assignment]
    failed = await processor.process(keyed("acme", chat("r-f"), headers=cid("c-1")))
    assert failed.error_code == "internal"
    again = await processor.process(keyed("acme", chat("r-f"), headers=cid("c-2")))
    assert again.status == "ok" and not again.replayed


async def test_a_reply_larger_than_the_cap_is_not_kept_and_a_retry_is_a_duplicate() -> None:
    processor, _publisher = quota_processor()
    store = store_of(processor)
    store.settings = store.settings.model_copy(update={"stored_answer_max_bytes": 10})
    await processor.process(keyed("acme", chat("r-big"), headers=cid("c-1")))
    retry = await processor.process(keyed("acme", chat("r-big"), headers=cid("c-2")))
    assert retry.error_code == "duplicate_request" and not retry.replayed


async def test_the_stored_answer_survives_a_restore_from_the_state_topic() -> None:
    processor, publisher = quota_processor()
    record = keyed("acme", chat("r-restore"), headers=cid("c-1"))
    await processor.process(record)
    store = store_of(processor)
    ledger = store._ledgers[record.partition]
    # What was written to the compacted state topic, read back into a fresh ledger.
    written = [
        QuotaCharge.model_validate_json(value)
        for _, _, value in ledger.take_dirty()
        + [(k, b"", ledger.record(k).model_dump_json().encode()) for k in ledger.charges()]  # type: ignore[union-attr]
    ]
    fresh = QuotaLedger(record.partition, store.book, ZoneInfo("UTC"))
    for charge in written:
        fresh.load(charge, datetime.now(UTC))
    store._ledgers[record.partition] = fresh
    retry = await processor.process(keyed("acme", chat("r-restore"), headers=cid("c-2")))
    assert retry.replayed
    assert [r.meta.replayed for _, r, _ in replies(publisher)] == [None, True]


async def test_a_stored_reply_goes_only_where_a_v2_signature_says() -> None:
    """v1 does not sign the route: a v1 retry is refused as before (duplicate_request), so a
    captured v1 record cannot have an answer sent to another route; v2 gets it replayed."""
    import json

    from consumer.auth.keys import KeyRing, TenantKey
    from tests.support.rdkafka import sign_v1, sign_v2

    secret = "acme-secret-0123456789abcdef"
    processor, _publisher = quota_processor()
    processor._keyring = KeyRing({"acme": [TenantKey(key_id="acme-1", secret=secret)]})

    def signed(body: dict[str, object], correlation: str, version: int) -> InboundRecord:
        value = json.dumps({**body, "tenant_id": "acme"}).encode()
        if version == 1:
            signature = sign_v1(value, "acme", "acme-1", secret)
        else:
            signature = sign_v2(value, "acme", "acme-1", secret, correlation=correlation.encode())
        return keyed("acme", body, headers=(*cid(correlation), *signature))

    assert (await processor.process(signed(chat("v1"), "c-1", 1))).status == "ok"
    v1_retry = await processor.process(signed(chat("v1"), "c-2", 1))
    assert v1_retry.error_code == "duplicate_request" and not v1_retry.replayed
    assert (await processor.process(signed(chat("v2"), "c-3", 2))).status == "ok"
    v2_retry = await processor.process(signed(chat("v2"), "c-4", 2))
    assert v2_retry.replayed and v2_retry.status == "ok"

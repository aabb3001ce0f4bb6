"""End to end: every outcome of a request leaves one usage row with the right status and code.

Real consumer processes (fake engine) against the real broker; the rows are read the way an
analyst reads them, from the read-only `usage.duckdb` catalog. Outcomes: ok, validation,
quota_exceeded (a tiny daily limit), deadline_exceeded (a deadline in the past, a 1 ms
timeout), dead letter (an undecodable record: error row with code `dlq`), and unauthorized
(an unsigned request to a consumer that requires signatures).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from schemas.headers import CORRELATION_ID, REPLY_TO
from schemas.signing import sign
from schemas.usage import USAGE_COLUMNS
from tests.support.harness import (
    Broker,
    ConsumerProcess,
    TopicSet,
    base_settings,
    ensure_test_topics,
    log_tail,
    merge,
    start_consumer,
)
from tests.support.raw_kafka import RawProducer, TopicReader, dumps, summarize_body
from tests.support.usage_queries import query_usage, wait_usage

MARKER = "PROMPT-TEXT-MUST-NOT-BE-LOGGED"
SECRET = "an-e2e-signing-secret-of-at-least-32-chars"
SIGNED_TENANT = "signed-tenant"
DAILY_LIMIT = 2


def body_of(tenant: str, cid: str, **extra: Any) -> dict[str, Any]:
    body = summarize_body(tenant, cid, **extra)
    body["text"] = f"{MARKER} {body['text']}"
    return body


async def test_every_outcome_leaves_a_usage_row(
    broker: Broker, topics: TopicSet, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    open_dir, auth_dir = tmp_path / "open", tmp_path / "auth"
    open_settings = merge(
        base_settings(broker, topics, open_dir),
        {"quota": {"default_daily_requests": DAILY_LIMIT}},
    )
    auth_topics = TopicSet.unique()
    await ensure_test_topics(broker, auth_topics)
    auth_settings = merge(
        base_settings(broker, auth_topics, auth_dir, auth=True),
        {
            "auth": {
                "required": True,
                "keys": {SIGNED_TENANT: [{"key_id": f"key-{tag}", "secret": SECRET}]},
            }
        },
    )
    open_log, auth_log = tmp_path / "open.log", tmp_path / "auth.log"
    open_consumer, auth_consumer = await asyncio.gather(
        start_consumer(ConsumerProcess(open_settings, log_path=open_log, instance_id="e2e-open")),
        start_consumer(ConsumerProcess(auth_settings, log_path=auth_log, instance_id="e2e-auth")),
    )
    try:
        # correlation id -> (body, expected status, expected error code)
        cases: dict[str, tuple[dict[str, Any], str, str | None]] = {}

        def case(kind: str, tenant: str, status: str, code: str | None, **extra: Any) -> None:
            cid = f"e2e-{tag}-{kind}-{len(cases)}"
            cases[cid] = (body_of(tenant, cid, **extra), status, code)

        case("ok", f"ok-{tag}", "ok", None)
        case("validation", f"val-{tag}", "error", "validation", max_sentences=0)
        case("validation", f"val-{tag}", "error", "validation", operation="translate")
        for _ in range(DAILY_LIMIT):
            case("within-quota", f"quota-{tag}", "ok", None)
        case(
            "deadline", f"late-{tag}", "error", "deadline_exceeded", deadline="2001-01-01T00:00:00Z"
        )
        case("timeout", f"late-{tag}", "error", "deadline_exceeded", timeout_ms=1)
        over_quota = f"e2e-{tag}-over-quota"

        async with (
            TopicReader(broker.bootstrap, topics.replies) as replies,
            TopicReader(broker.bootstrap, auth_topics.replies) as auth_replies,
            RawProducer(broker.bootstrap) as producer,
        ):
            await producer.send_requests(
                topics.requests, topics.replies, [body for body, _, _ in cases.values()]
            )
            # Sent after the others were answered, so it is the one over the limit.
            await replies.until(lambda: set(cases) <= replies.by_correlation().keys(), 60)
            await producer.send_requests(
                topics.requests,
                topics.replies,
                [body_of(f"quota-{tag}", over_quota)],
            )
            cases[over_quota] = (body_of(f"quota-{tag}", over_quota), "error", "quota_exceeded")
            # An undecodable record: dead-lettered (and answered, since it names a reply target).
            dead_cid = f"e2e-{tag}-dead"
            [dead_at] = await producer.send_many(
                topics.requests,
                [
                    (
                        b"k",
                        b"\xff" + MARKER.encode(),
                        [(CORRELATION_ID, dead_cid.encode()), (REPLY_TO, topics.replies.encode())],
                    )
                ],
            )

            # Unsigned and signed requests to the consumer that requires signatures.
            unsigned_cid, signed_cid = f"e2e-{tag}-unsigned", f"e2e-{tag}-signed"
            await producer.send_requests(
                auth_topics.requests,
                auth_topics.replies,
                [body_of(SIGNED_TENANT, unsigned_cid)],
            )
            signed = dumps(body_of(SIGNED_TENANT, signed_cid))
            await producer.send_many(
                auth_topics.requests,
                [
                    (
                        SIGNED_TENANT.encode(),
                        signed,
                        [
                            (CORRELATION_ID, signed_cid.encode()),
                            (REPLY_TO, auth_topics.replies.encode()),
                            *sign(signed, SIGNED_TENANT, f"key-{tag}", SECRET, time.time()),
                        ],
                    )
                ],
            )
            want = {*cases, dead_cid}
            assert await replies.until(lambda: want <= replies.by_correlation().keys(), 60), (
                sorted(want - replies.by_correlation().keys()),
                log_tail(open_log),
            )
            auth_want = {unsigned_cid, signed_cid}
            assert await auth_replies.until(
                lambda: auth_want <= auth_replies.by_correlation().keys(), 60
            ), log_tail(auth_log)
            grouped = replies.by_correlation()
            auth_grouped = auth_replies.by_correlation()

        # The replies say what the rows must say.
        for cid, (_, status, code) in cases.items():
            reply = grouped[cid][0]
            assert reply["status"] == status, (cid, reply)
            assert (reply.get("error") or {}).get("code") == code, (cid, reply)
        assert grouped[dead_cid][0]["error"]["code"] == "validation"
        assert auth_grouped[unsigned_cid][0]["error"]["code"] == "unauthorized"
        assert auth_grouped[signed_cid][0]["status"] == "ok", auth_grouped[signed_cid]

        sql = "SELECT correlation_id, status, error_code, count(*) FROM usage_raw GROUP BY ALL"
        rows = await asyncio.to_thread(
            wait_usage, open_dir / "usage", sql, lambda r: len(r) >= len(cases) + 1, 30.0
        )
        logged = {cid: (status, code, n) for cid, status, code, n in rows}
        for cid, (_, status, code) in cases.items():
            assert logged.get(cid) == (status, code, 1), (cid, logged.get(cid))
        dlq_rows = query_usage(
            open_dir / "usage",
            "SELECT status, error_code, tenant_id, request_id, input_chars FROM usage_raw "
            "WHERE kafka_partition = ? AND kafka_offset = ?",
            list(dead_at),
        )
        assert dlq_rows == [("error", "dlq", None, None, 0)], dlq_rows

        auth_rows = await asyncio.to_thread(
            wait_usage, auth_dir / "usage", sql, lambda r: len(r) >= 2, 30.0
        )
        auth_logged = {cid: (status, code, n) for cid, status, code, n in auth_rows}
        assert auth_logged.get(unsigned_cid) == ("error", "unauthorized", 1), auth_logged
        assert auth_logged.get(signed_cid) == ("ok", None, 1), auth_logged

        # Counts and timings only: the schema's columns, and no request text anywhere.
        for usage_dir in (open_dir / "usage", auth_dir / "usage"):
            described = query_usage(usage_dir, "DESCRIBE usage_raw")
            columns = {name: kind for name, kind, *_ in described}
            assert set(columns) == {name for name, _ in USAGE_COLUMNS} | {"date", "hour"}, columns
            text_columns = [name for name, kind in columns.items() if kind == "VARCHAR"]
            everything = query_usage(usage_dir, f"SELECT {', '.join(text_columns)} FROM usage_raw")
            assert everything
            assert MARKER not in json.dumps(everything, default=str)
        ok_row = query_usage(
            open_dir / "usage",
            "SELECT input_chars, input_tokens, output_tokens, model FROM usage "
            "WHERE correlation_id = ?",
            [next(c for c, v in cases.items() if "-ok-" in c)],
        )
        [(chars, tokens_in, tokens_out, model)] = ok_row
        assert chars > 0 and tokens_in > 0 and tokens_out > 0 and model == "fake-model"

        assert open_consumer.stop() == 0, log_tail(open_log)
        assert auth_consumer.stop() == 0, log_tail(auth_log)
    finally:
        open_consumer.kill()
        auth_consumer.kill()

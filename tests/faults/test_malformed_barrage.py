"""A barrage of hypothesis-generated garbage, interleaved with valid requests.

Every malformed record must end somewhere (DESIGN.md "Guarantees"): an error reply when it
named a correlation id (header, or a body `request_id`) and an allowed reply topic, a DLQ
entry when it cannot be answered or cannot be decoded (both for an undecodable record that
named a reply target). Valid traffic around it is served, every record leaves a usage row,
offsets are committed to the end (nothing blocks a partition), and the consumer is healthy.

Each example is one record of a single run against a real consumer (a round trip per
example would take minutes), so hypothesis generates and the test checks the whole batch;
the seed is printed in failure messages to reproduce a batch.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from schemas.headers import (
    CORRELATION_ID,
    DLQ_ORIGIN_OFFSET,
    DLQ_ORIGIN_PARTITION,
    DLQ_ORIGIN_TOPIC,
    DLQ_REASON,
    REPLY_TO,
)
from schemas.requests import OPERATIONS
from tests.support.harness import (
    Broker,
    ConsumerProcess,
    TopicSet,
    base_settings,
    ends_of,
    log_tail,
    new_topics,
    start_consumer,
    wait_committed,
)
from tests.support.raw_kafka import RawProducer, TopicReader, header, summarize_body
from tests.support.usage_queries import wait_usage

# A broker of its own, and one rerun on a fresh one when Tansu wedges (tests/conftest.py).
pytestmark = pytest.mark.flaky(reruns=1)

MAX_EXAMPLES = 150
VALID_EVERY = 4  # one valid request after every few malformed records

Header = tuple[str, bytes]


@dataclass
class Case:
    key: bytes | None
    value: bytes | None
    headers: list[Header]
    valid: bool = False
    reply_cid: str | None = None  # the correlation id a reply must carry, when one is due
    dead_letter: bool = False
    json_object: bool = False
    where: tuple[int, int] = (-1, -1)
    extra: dict[str, Any] = field(default_factory=dict)


def last_header(headers: list[Header], name: str) -> str | None:
    """What the consumer reads: the last header of that name, None unless UTF-8."""
    for key, value in reversed(headers):
        if key.lower() == name:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return None
    return None


def decoded_object(value: bytes | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError):
        return None
    return decoded if isinstance(decoded, dict) else None


def expect(case: Case, topics: TopicSet) -> Case:
    """Fill in what the contract promises for this record."""
    body = decoded_object(case.value)
    case.json_object = body is not None
    cid = last_header(case.headers, CORRELATION_ID) or None
    reply_to = last_header(case.headers, REPLY_TO) or topics.replies
    allowed = reply_to == topics.replies  # the only allowed one the generator produces
    if body is None:
        case.dead_letter = True
        case.reply_cid = cid if allowed else None
        return case
    request_id = body.get("request_id")
    if cid is None and isinstance(request_id, str) and 0 < len(request_id) <= 128:
        cid = request_id
    case.reply_cid = cid if allowed else None
    case.dead_letter = not allowed or cid is None
    return case


def json_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=40)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
        max_leaves=16,
    )


def request_like() -> st.SearchStrategy[dict[str, Any]]:
    """Objects shaped like requests, with fields of the wrong type or out of range."""
    text = st.text(max_size=200)
    return st.fixed_dictionaries(
        {
            "operation": st.sampled_from([*OPERATIONS, "delete", ""]) | json_values(),
            "tenant_id": st.sampled_from(["acme", "t-1"]) | st.text(max_size=140) | json_values(),
        },
        optional={
            "request_id": st.text(max_size=140) | st.integers(),
            "text": text | json_values(),
            "max_sentences": st.integers(-3, 30),
            "target_language": st.sampled_from(["de", "xx-", "auto", ""]),
            "categories": st.lists(st.text(max_size=20), max_size=4),
            "messages": st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.sampled_from(["user", "system", "assistant", "tool"]),
                        "content": text,
                    }
                ),
                max_size=3,
            ),
            "max_tokens": st.integers(-5, 10**6),
            "timeout_ms": st.integers(-1, 5),
            "deadline": st.text(max_size=30) | st.just("1999-01-01T00:00:00Z"),
            "schema_version": st.integers(0, 3),
            "unexpected": json_values(),
        },
    )


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def bodies() -> st.SearchStrategy[bytes | None]:
    return st.one_of(
        st.binary(max_size=300),
        json_values().map(dumps),
        request_like().map(dumps),
        request_like().map(lambda b: json.dumps(b).encode("utf-16")),  # JSON, not UTF-8
        st.sampled_from(
            [
                None,  # a tombstone
                b"",
                b"[" * 50_000,  # nested too deeply for the decoder
                b'{"a": 1e999999}',
                b"{NaN}",
                b"\xef\xbb\xbf{}",  # UTF-8 BOM
                b'{"operation": "summarize"',  # truncated
                b'"just a string"',
            ]
        ),
    )


def headers_of(topics: TopicSet) -> st.SearchStrategy[dict[str, Any]]:
    cid = st.one_of(
        st.none(),
        st.just(b""),
        st.just(b"\xff\xfe-not-utf8"),
        st.text(max_size=300).map(lambda s: ("unique", s)),  # a unique prefix is added later
    )
    reply_to = st.one_of(
        st.none(),
        st.just(topics.replies),
        st.sampled_from(
            [topics.requests, topics.dlq, topics.control, "ops.control.v1", "elsewhere", ""]
        ),
    )
    junk = st.lists(
        st.tuples(
            st.sampled_from(["traceparent", "tracestate", "content-type", "x-junk", "Reply_To"])
            | st.text(max_size=12),
            st.binary(max_size=60),
        ),
        max_size=3,
    )
    return st.fixed_dictionaries({"cid": cid, "reply_to": reply_to, "junk": junk})


def generate_cases(topics: TopicSet, batch_seed: int) -> list[Case]:
    """Draw MAX_EXAMPLES malformed records with hypothesis (generation only, no shrinking)."""
    drawn: list[tuple[bytes | None, bytes | None, dict[str, Any]]] = []

    @seed(batch_seed)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(key=st.none() | st.binary(max_size=16), value=bodies(), extra=headers_of(topics))
    def draw(key: bytes | None, value: bytes | None, extra: dict[str, Any]) -> None:
        drawn.append((key, value, extra))

    draw()
    tag = uuid.uuid4().hex[:6]
    cases = []
    for index, (key, value, extra) in enumerate(drawn):
        body = decoded_object(value)
        if body is not None and isinstance(body.get("request_id"), str):
            # Body request ids become correlation ids: keep them unique across the batch.
            body["request_id"] = f"rid-{tag}-{index}"
            value = dumps(body)
        if value is None and key is None:
            key = b"tombstone"  # Kafka needs a key or a value
        headers: list[Header] = list(extra["junk"])
        cid = extra["cid"]
        if isinstance(cid, tuple):
            headers.append((CORRELATION_ID, f"mal-{tag}-{index}-{cid[1]}".encode()))
        elif cid is not None:
            headers.append((CORRELATION_ID, cid))
        if extra["reply_to"] is not None:
            headers.append((REPLY_TO, extra["reply_to"].encode()))
        cases.append(expect(Case(key, value, headers), topics))
    return cases


async def test_malformed_barrage_is_answered_or_dead_lettered_and_valid_traffic_served(
    fresh_broker: Broker, tmp_path: Path
) -> None:
    topics = await new_topics(fresh_broker)
    batch_seed = random.randrange(2**32)
    context = f" (hypothesis seed {batch_seed})"
    malformed = generate_cases(topics, batch_seed)
    cases: list[Case] = []
    for index, case in enumerate(malformed):
        cases.append(case)
        if index % VALID_EVERY == 0:
            body = summarize_body("barrage-tenant", f"valid-{uuid.uuid4().hex[:8]}-{index}")
            valid = Case(
                b"barrage-tenant",
                dumps(body),
                [
                    (CORRELATION_ID, body["request_id"].encode()),
                    (REPLY_TO, topics.replies.encode()),
                ],
                valid=True,
            )
            cases.append(expect(valid, topics))

    log_path = tmp_path / "consumer.log"
    consumer = await start_consumer(
        ConsumerProcess(base_settings(fresh_broker, topics, tmp_path), log_path=log_path)
    )
    try:
        async with RawProducer(fresh_broker.bootstrap) as producer:
            where = await producer.send_many(
                topics.requests, ((c.key, c.value, c.headers) for c in cases)
            )
        for case, position in zip(cases, where, strict=True):
            case.where = position

        want_replies = {c.reply_cid for c in cases if c.reply_cid is not None}
        want_dlq = {c.where for c in cases if c.dead_letter}
        async with (
            TopicReader(fresh_broker.bootstrap, topics.replies) as replies,
            TopicReader(fresh_broker.bootstrap, topics.dlq) as dlq,
        ):

            def dead_lettered() -> dict[tuple[int, int], Any]:
                return {
                    (
                        int(header(r, DLQ_ORIGIN_PARTITION) or -1),
                        int(header(r, DLQ_ORIGIN_OFFSET) or -1),
                    ): r
                    for r in dlq.records
                }

            await replies.until(lambda: want_replies <= replies.by_correlation().keys(), 60)
            await dlq.until(lambda: want_dlq <= dead_lettered().keys(), 30)
            # Once every record is committed, nothing more is answered or dead-lettered:
            # reading both topics to their end then also collects any stray or duplicate.
            positions = {c.where for c in cases}
            behind = await wait_committed(
                fresh_broker.bootstrap, topics.group, topics.requests, ends_of(positions), 20
            )
            await replies.read_to_end()
            await dlq.read_to_end()
            grouped = replies.by_correlation()
            letters = dead_lettered()

        unanswered = [c for c in cases if c.reply_cid is not None and c.reply_cid not in grouped]
        assert not unanswered, (
            f"{len(unanswered)} records got no reply, e.g. {unanswered[:2]}{context}"
            + log_tail(log_path)
        )
        not_dead = [c for c in cases if c.dead_letter and c.where not in letters]
        assert not not_dead, f"{len(not_dead)} records not dead-lettered: {not_dead[:2]}{context}"
        lost = [c for c in cases if c.reply_cid is None and not c.dead_letter]
        assert not lost, f"the expectation model lost records: {lost[:2]}"

        for case in cases:
            if case.valid:
                assert [r["status"] for r in grouped[case.reply_cid]] == ["ok"], case
            elif case.reply_cid is not None and not case.json_object:
                for reply in grouped[case.reply_cid]:
                    assert reply["status"] == "error", (case, reply)
                    assert reply["error"]["code"] == "validation", (case, reply)
            if case.dead_letter:
                letter = letters[case.where]
                assert (letter.value or b"") == (case.value or b""), case
                assert header(letter, DLQ_ORIGIN_TOPIC) == topics.requests
                assert header(letter, DLQ_REASON), case
        # Nothing was answered that should not have been (a disallowed reply_to included).
        expected_cids = {c.reply_cid for c in cases}
        strays = set(grouped) - expected_cids
        assert not strays, f"unexpected replies: {sorted(strays)[:5]}{context}"

        # Every record left a usage row, and every partition's offsets were committed.
        rows = await asyncio.to_thread(
            wait_usage,
            tmp_path / "usage",
            "SELECT DISTINCT kafka_partition, kafka_offset FROM usage_raw",
            lambda found: positions <= set(found),
            30.0,
        )
        missing_rows = positions - set(rows)
        assert not missing_rows, (
            f"{len(missing_rows)} records left no usage row, e.g. "
            f"{[c for c in cases if c.where in missing_rows][:2]}{context}" + log_tail(log_path)
        )
        outcomes = {
            (partition, offset): (status, code)
            for partition, offset, status, code in await asyncio.to_thread(
                wait_usage,
                tmp_path / "usage",
                "SELECT kafka_partition, kafka_offset, status, error_code FROM usage_raw",
                lambda found: True,
                0,
            )
        }
        for case in cases:
            logged = outcomes[case.where]
            if case.valid:
                assert logged == ("ok", None), (case, logged)
            elif case.dead_letter:
                assert logged == ("error", "dlq"), (case, logged)
        assert not behind, f"(committed, wanted) offsets not caught up: {behind}{context}"

        status, body = consumer.get("/health")
        assert status == 200 and body["status"] == "healthy", body
        assert consumer.get("/ready")[0] == 200
        assert consumer.stop() == 0, log_tail(log_path)
    finally:
        consumer.kill()

"""Reply routes: opstream's, Spring Kafka's and SmallRye's request-reply headers (pure)."""

from __future__ import annotations

import uuid

from consumer.bus.records import (
    InboundRecord,
    printable_id,
    record_fingerprint,
    reply_route,
    signed_routing,
)
from schemas.headers import FORWARDED_FROM

DEFAULT = "ops.replies.v1"


def rec(*headers: tuple[str, bytes], value: bytes = b"{}") -> InboundRecord:
    return InboundRecord(
        topic="ops.requests.v1",
        partition=0,
        offset=1,
        key=b"acme",
        value=value,
        headers=tuple(headers),
        timestamp_ms=0,
        received_at=0.0,
    )


def test_opstream_headers_route_to_reply_to_or_the_default() -> None:
    route = reply_route(rec(("correlation_id", b"abc-1")), DEFAULT)
    assert route is not None
    assert (route.topic, route.partition, route.correlation_header) == (
        DEFAULT,
        None,
        "correlation_id",
    )
    assert route.correlation == b"abc-1" and route.correlation_id == "abc-1"
    named = reply_route(rec(("correlation_id", b"x"), ("reply_to", b"ops.replies.team")), DEFAULT)
    assert named is not None and named.topic == "ops.replies.team"


def test_spring_headers_keep_binary_correlation_and_reply_partition() -> None:
    correlation = uuid.UUID("123e4567-e89b-12d3-a456-426614174000").bytes
    route = reply_route(
        rec(
            ("kafka_replyTopic", b"ops.replies.java"),
            ("kafka_correlationId", correlation),
            ("kafka_replyPartition", (3).to_bytes(4, "big")),
        ),
        DEFAULT,
    )
    assert route is not None
    assert route.topic == "ops.replies.java" and route.partition == 3
    assert route.correlation_header == "kafka_correlationId" and route.correlation == correlation
    assert route.correlation_id == "123e4567e89b12d3a456426614174000"


def test_smallrye_headers_are_answered_in_their_own_names() -> None:
    route = reply_route(
        rec(
            ("REPLY_CORRELATION_ID", b"6a1f7e2c-0d3b-4c55-9a8e-2f1b3c4d5e6f"),
            ("REPLY_TOPIC", b"ops.replies.quarkus"),
            ("REPLY_PARTITION", (0).to_bytes(4, "big")),
        ),
        DEFAULT,
    )
    assert route is not None
    assert route.correlation_header == "REPLY_CORRELATION_ID"
    assert (route.topic, route.partition) == ("ops.replies.quarkus", 0)


def test_no_correlation_header_means_no_route() -> None:
    assert reply_route(rec(("reply_to", b"ops.replies.v1")), DEFAULT) is None


def test_a_malformed_reply_partition_is_ignored() -> None:
    route = reply_route(
        rec(("kafka_correlationId", b"id"), ("kafka_replyPartition", b"\xff\xff")), DEFAULT
    )
    assert route is not None and route.partition is None


def test_printable_ids_stay_text_and_binary_ones_become_hex() -> None:
    assert printable_id(b"req-42") == "req-42"
    assert printable_id(b"\x00\x01") == "0001"
    assert printable_id(b"has space") == b"has space".hex()


def test_signed_routing_covers_what_routes_the_answer() -> None:
    assert signed_routing(rec(("correlation_id", b"c1"), ("reply_to", b"ops.replies.a"))) == (
        b"c1",
        "ops.replies.a",
        "",
    )
    assert signed_routing(rec()) == (b"", "", "")
    spring = rec(("kafka_correlationId", b"\x01"), ("kafka_replyPartition", (2).to_bytes(4, "big")))
    assert signed_routing(spring) == (b"\x01", "", "2")


def test_fingerprint_tells_a_verbatim_copy_from_any_change() -> None:
    original = rec(("correlation_id", b"c1"), ("reply_to", b"ops.replies.a"), value=b'{"a":1}')
    forwarded = rec(*original.headers, (FORWARDED_FROM, b"t/3/9"), value=b'{"a":1}')
    assert record_fingerprint(original) == record_fingerprint(forwarded)
    moved = rec(("correlation_id", b"c1"), ("reply_to", b"ops.replies.b"), value=b'{"a":1}')
    assert record_fingerprint(original) != record_fingerprint(moved)
    other_body = rec(*original.headers, value=b'{"a":2}')
    assert record_fingerprint(original) != record_fingerprint(other_body)


def test_a_correlation_id_that_is_not_text_counts_as_absent() -> None:
    assert reply_route(rec(("correlation_id", b"\xff\xfe-not-utf8")), DEFAULT) is None

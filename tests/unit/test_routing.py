"""Steps 0-2 as one pure decision: forward, dead-letter (and maybe answer) or serve."""

from __future__ import annotations

import json

from consumer.bus.records import InboundRecord
from consumer.pipeline.routing import DeadLetter, Forward, Serve, route_record
from consumer.quota.partitions import partition_for_key
from schemas.headers import CORRELATION_ID, FORWARDED_FROM, REPLY_TO
from topics.catalog import TopicSettings

TOPICS = TopicSettings()
BODY = {"operation": "summarize", "tenant_id": "acme", "text": "A. B.", "request_id": "r-1"}


def record(
    value: bytes | None = json.dumps(BODY).encode(),
    *,
    key: bytes | None = b"acme",
    partition: int | None = None,
    headers: tuple[tuple[str, bytes], ...] = ((CORRELATION_ID, b"c-1"),),
) -> InboundRecord:
    home = partition_for_key(b"acme", TOPICS.request_partitions)
    return InboundRecord(
        topic=TOPICS.requests,
        partition=home if partition is None else partition,
        offset=7,
        key=key,
        value=value,
        headers=headers,
        timestamp_ms=1_000,
        received_at=1.0,
    )


def other_partition() -> int:
    return (partition_for_key(b"acme", TOPICS.request_partitions) + 1) % TOPICS.request_partitions


def test_a_record_off_its_tenants_partition_is_forwarded_when_quotas_count() -> None:
    misplaced = record(partition=other_partition())
    decision = route_record(misplaced, TOPICS, tenant_partitions=TOPICS.request_partitions)
    assert decision == Forward(partition=partition_for_key(b"acme", TOPICS.request_partitions))


def test_without_quotas_or_once_forwarded_a_misplaced_record_is_served_where_it_is() -> None:
    misplaced = record(partition=other_partition())
    assert isinstance(route_record(misplaced, TOPICS, tenant_partitions=None), Serve)
    forwarded = record(
        partition=other_partition(),
        headers=((CORRELATION_ID, b"c-1"), (FORWARDED_FROM, b"ops.requests.v1/3/9")),
    )
    decision = route_record(forwarded, TOPICS, tenant_partitions=TOPICS.request_partitions)
    assert isinstance(decision, Serve)


def test_a_decodable_request_is_served_on_its_reply_route_with_what_it_says() -> None:
    decision = route_record(record(), TOPICS, tenant_partitions=TOPICS.request_partitions)
    assert isinstance(decision, Serve)
    assert (decision.route.topic, decision.correlation_id) == (TOPICS.replies, "c-1")
    assert (decision.tenant_id, decision.operation) == ("acme", "summarize")
    assert decision.body == BODY and not decision.is_cancel


def test_an_undecodable_body_is_dead_lettered_and_answered_when_its_route_is_allowed() -> None:
    decision = route_record(record(b"not json"), TOPICS, tenant_partitions=None)
    assert isinstance(decision, DeadLetter)
    assert decision.reason.startswith("undecodable: ")
    assert decision.answer_to is not None and decision.answer_to.topic == TOPICS.replies
    assert decision.problem and decision.problem.startswith("body is not a JSON object")
    assert decision.correlation_id == "c-1"


def test_an_undecodable_body_asking_for_a_forbidden_topic_is_not_answered() -> None:
    headers = ((CORRELATION_ID, b"c-1"), (REPLY_TO, b"ops.control.v1"))
    decision = route_record(record(b"", headers=headers), TOPICS, tenant_partitions=None)
    assert isinstance(decision, DeadLetter) and decision.answer_to is None


def test_a_forbidden_reply_topic_is_dead_lettered_with_what_the_body_says() -> None:
    headers = ((CORRELATION_ID, b"c-1"), (REPLY_TO, b"ops.control.v1"))
    decision = route_record(record(headers=headers), TOPICS, tenant_partitions=None)
    assert isinstance(decision, DeadLetter) and decision.answer_to is None
    assert decision.reason == "reply_to topic 'ops.control.v1' is not allowed"
    assert (decision.tenant_id, decision.operation) == ("acme", "summarize")


def test_a_request_without_correlation_header_correlates_by_request_id() -> None:
    decision = route_record(record(headers=()), TOPICS, tenant_partitions=None)
    assert isinstance(decision, Serve) and decision.correlation_id == "r-1"


def test_a_request_with_no_way_to_match_its_answer_is_dead_lettered() -> None:
    body = {key: value for key, value in BODY.items() if key != "request_id"}
    decision = route_record(record(json.dumps(body).encode(), headers=()), TOPICS,
                            tenant_partitions=None)  # fmt: skip
    assert decision == DeadLetter(
        reason="no correlation_id header and no request_id",
        tenant_id="acme",
        operation="summarize",
    )


def test_an_unknown_operation_is_served_but_not_named() -> None:
    body = {**BODY, "operation": "delete"}
    decision = route_record(record(json.dumps(body).encode()), TOPICS, tenant_partitions=None)
    assert isinstance(decision, Serve) and decision.operation is None


def test_a_cancel_is_served_as_a_cancel() -> None:
    body = {"operation": "cancel", "tenant_id": "acme", "request_id": "r-1"}
    decision = route_record(record(json.dumps(body).encode()), TOPICS, tenant_partitions=None)
    assert isinstance(decision, Serve) and decision.is_cancel

"""Steps 0-2 decided: forward a record, dead-letter it, or serve it (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from consumer.bus.records import InboundRecord, ReplyRoute, reply_route
from consumer.pipeline.checks import home_partition
from consumer.pipeline.decode import body_route, decode_object, str_or_none
from schemas.headers import REPLY_TO
from schemas.requests import OPERATIONS
from topics.catalog import TopicSettings


@dataclass(frozen=True, slots=True, kw_only=True)
class Forward:
    """Step 0: the record sits on another partition than its tenant's; copy it there."""

    partition: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Learned:
    """What the record says of itself, as far as it could be read (for the outcome)."""

    correlation_id: str | None = None
    tenant_id: str | None = None
    operation: str | None = None  # one of the contract's operations, else None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter(Learned):
    """Steps 1-2 failed: the record goes to the DLQ with `reason`. An undecodable body whose
    reply route is allowed is also answered there: `answer_to`, with `problem`."""

    reason: str
    answer_to: ReplyRoute | None = None
    problem: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Serve(Learned):
    """Steps 1-2 passed: validate, authenticate, reserve and run `body` (or, for a `cancel`,
    stop the request it names), answering on `route`."""

    route: ReplyRoute
    body: dict[str, Any]

    @property
    def is_cancel(self) -> bool:
        return self.body.get("operation") == "cancel"


Routing = Forward | DeadLetter | Serve


def route_record(
    record: InboundRecord, topics: TopicSettings, *, tenant_partitions: int | None
) -> Routing:
    """Where `record` goes next. `tenant_partitions` is the request topic's partition count
    when quotas count per partition (a record must then sit on its tenant's), else None."""
    # 0. A record on another partition than its tenant's moves there first (quotas and
    #    the replay guard count per partition).
    if tenant_partitions is not None:
        home = home_partition(record, tenant_partitions)
        if home is not None:
            return Forward(partition=home)

    # 1. Decode. What cannot be read goes to the DLQ (with an error reply if it can).
    route = reply_route(record, topics.replies)
    correlation_id = route.correlation_id if route else None
    body, undecodable = decode_object(record.value)
    if body is None:
        allowed = route is not None and topics.reply_topic_allowed(route.topic)
        return DeadLetter(
            reason=f"undecodable: {undecodable}",
            correlation_id=correlation_id,
            answer_to=route if allowed else None,
            problem=f"body is not a JSON object: {undecodable}",
        )
    tenant_id = str_or_none(body.get("tenant_id"), 128)
    operation = body.get("operation")
    operation = operation if operation in OPERATIONS else None
    if route is None:
        request_id = str_or_none(body.get("request_id"), 128)
        route = body_route(record, request_id, topics.replies)
        correlation_id = request_id

    # 2. Where the answer goes must be allowed, and there must be a way to match it.
    reply_to = route.topic if route else record.header(REPLY_TO) or topics.replies
    if not topics.reply_topic_allowed(reply_to) or route is None:
        reason = (
            "no correlation_id header and no request_id"
            if topics.reply_topic_allowed(reply_to)
            else f"reply_to topic '{reply_to[:200]}' is not allowed"
        )
        return DeadLetter(
            reason=reason, correlation_id=correlation_id, tenant_id=tenant_id, operation=operation
        )
    return Serve(
        route=route,
        body=body,
        correlation_id=correlation_id,
        tenant_id=tenant_id,
        operation=operation,
    )

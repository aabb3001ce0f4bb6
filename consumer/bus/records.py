"""Kafka records as the pipeline sees them, and the reply route a record asks for."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from schemas.headers import FORWARDED_FROM, REPLY_CONVENTIONS, REPLY_TO

Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class InboundRecord:
    """One request record as fetched: where it came from and its raw bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int
    received_at: float  # unix seconds when this instance dequeued it
    # Who set `timestamp_ms`: 0 the producer (CreateTime), 1 the broker (LogAppendTime).
    timestamp_type: int = 0

    def header(self, name: str) -> str | None:
        """The last value of header `name` as text (None when absent or not UTF-8)."""
        for key, value in reversed(self.headers):
            if key.lower() == name:
                try:
                    return value.decode("utf-8") if value is not None else None
                except UnicodeDecodeError:
                    return None
        return None


def as_headers(pairs: Sequence[tuple[str, bytes | None]]) -> Headers:
    return tuple((k, v if v is not None else b"") for k, v in pairs)


def inbound_record(raw: Any, received_at: float) -> InboundRecord:
    """The pipeline's view of one aiokafka `ConsumerRecord`, dequeued at `received_at`."""
    return InboundRecord(
        topic=raw.topic,
        partition=raw.partition,
        offset=raw.offset,
        key=raw.key,
        value=raw.value,
        headers=as_headers(raw.headers or ()),
        timestamp_ms=raw.timestamp,
        received_at=received_at,
        timestamp_type=raw.timestamp_type,
    )


_PRINTABLE_ID = re.compile(r"[\x21-\x7e]{1,128}")


@dataclass(frozen=True, slots=True)
class ReplyRoute:
    """Where and under which correlation header a request's reply goes."""

    topic: str
    requested_topic: str | None  # the reply topic header as sent (None: the default topic)
    partition: int | None
    correlation_header: str
    correlation: bytes
    correlation_id: str  # printable form, for logs, usage rows and the default request_id


def reply_route(record: InboundRecord, default_topic: str) -> ReplyRoute | None:
    """The reply route a record asks for, or None when it names no correlation id.

    A request in opstream's own headers may omit `reply_to` (the default topic); one in
    Spring's or SmallRye's headers may name its topic in either convention.
    """
    for convention in REPLY_CONVENTIONS:
        correlation = _last(record.headers, convention.correlation)
        if not correlation or (convention.name == "opstream" and not is_utf8(correlation)):
            continue  # opstream's correlation_id is text; one that is not counts as absent
        topic = record.header(convention.reply_topic.lower()) or record.header(REPLY_TO)
        partition = None
        if convention.reply_partition is not None:
            partition = _partition(_last(record.headers, convention.reply_partition))
        return ReplyRoute(
            topic=topic or default_topic,
            requested_topic=topic,
            partition=partition,
            correlation_header=convention.correlation,
            correlation=correlation,
            correlation_id=printable_id(correlation),
        )
    return None


def signed_routing(record: InboundRecord) -> tuple[bytes, str, str]:
    """What signature v2 binds of a record's route: correlation bytes, reply topic header,
    reply partition; each empty when the record does not name it."""
    route = reply_route(record, "")
    if route is None:
        return b"", record.header(REPLY_TO) or "", ""
    partition = "" if route.partition is None else str(route.partition)
    return route.correlation, route.requested_topic or "", partition


def record_fingerprint(record: InboundRecord) -> str:
    """A digest of the record's value and headers (all but the forwarding mark): equal for
    a verbatim copy of a record, different for any other request."""
    digest = hashlib.sha256()
    for key, value in record.headers:
        if key.lower() == FORWARDED_FROM:
            continue
        for part in (key.encode("utf-8", "replace"), value or b""):
            digest.update(len(part).to_bytes(4, "big"))
            digest.update(part)
    digest.update(record.value or b"")
    return digest.hexdigest()[:32]


def printable_id(raw: bytes) -> str:
    """`raw` as text when it is a printable ASCII id, else its hex (a Spring UUID is binary)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return raw.hex()[:128]
    return text if _PRINTABLE_ID.fullmatch(text) else raw.hex()[:128]


def is_utf8(raw: bytes) -> bool:
    """Whether `raw` decodes as UTF-8."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _last(headers: Headers, name: str) -> bytes | None:
    lowered = name.lower()
    for key, value in reversed(headers):
        if key.lower() == lowered:
            return value
    return None


def _partition(raw: bytes | None) -> int | None:
    # Spring and SmallRye: a 4-byte big-endian int. Decimal text is accepted too.
    if raw is None:
        return None
    if len(raw) == 4:
        value = int.from_bytes(raw, "big", signed=True)
        return value if value >= 0 else None
    try:
        value = int(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if value >= 0 else None

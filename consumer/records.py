"""Kafka records as the pipeline sees them, and the headers of the contract."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CORRELATION_ID = "correlation_id"
REPLY_TO = "reply_to"
CONTENT_TYPE = "content-type"
JSON = "application/json"

# Added to dead-lettered records so an operator can find and replay the original.
DLQ_ORIGIN_TOPIC = "x-opstream-dlq-topic"
DLQ_ORIGIN_PARTITION = "x-opstream-dlq-partition"
DLQ_ORIGIN_OFFSET = "x-opstream-dlq-offset"
DLQ_REASON = "x-opstream-dlq-reason"
DLQ_INSTANCE = "x-opstream-dlq-instance"

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

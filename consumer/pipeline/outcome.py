"""What happened to one record (`Outcome`), and what the pipeline needs of the bus."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from consumer.bus.records import InboundRecord
from consumer.quota.ledger import Reservation


class RecordPublisher(Protocol):
    """Sends one record and returns once the broker has acknowledged it."""

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> None: ...


@dataclass(slots=True)
class Outcome:
    """What happened to one record: the facts a usage row and metrics need (no text)."""

    record: InboundRecord
    status: str  # "ok" | "error" | "dlq" | "forwarded" | "repeat" (the last two: no usage row)
    error_code: str | None = None
    tenant_id: str | None = None
    operation: str | None = None
    request_id: str | None = None
    correlation_id: str | None = None
    reply_topic: str | None = None
    model: str | None = None
    input_chars: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    queue_ms: float = 0.0
    execution_ms: float = 0.0
    first_token_ms: float | None = None
    finished_at: float = 0.0
    dlq_reason: str | None = None
    reservation: Reservation | None = None
    usage_receipt: Any = None  # the usage batch holding this outcome's row, once appended

    @property
    def leaves_usage_row(self) -> bool:
        """Forwarded records and repeats are logged by the record that answers them."""
        return self.status not in ("forwarded", "repeat")


class BrokerUnavailable(Exception):
    """A write the request depends on (quota state) was not acknowledged: retry the record."""

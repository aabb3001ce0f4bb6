"""What happened to one record (`Outcome`), the one account of how it ended (`Ending`) and
of where its time went (`Stages`), and what the pipeline needs of the bus."""

from __future__ import annotations

from dataclasses import dataclass, field
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
class Stages:
    """Where a request's time went, each stage measured once, in ms (None: never reached).

    Reply `meta`, usage columns, metrics, the trace and the console line all read these.
    `total_ms` runs from the fetch to the answer, so `admission + slot_wait + prefill +
    generation` adds up to it (within the few ms of shaping the result); `bus_ms` comes
    before the fetch and is not part of it.
    """

    bus_ms: float = 0.0  # record timestamp (producer's write) → this instance fetched it
    admission_ms: float | None = None  # fetch → handed to the engine (checks, quota write)
    slot_wait_ms: float | None = None  # handed to the engine → a slot took it (scheduler)
    prefill_ms: float | None = None  # slot taken → first token (the prompt computed)
    generation_ms: float | None = None  # first token → the last one
    engine_ms: float | None = None  # handed to the engine → its answer, as the pipeline saw it
    total_ms: float = 0.0  # fetch → the answer (the reply built)

    @property
    def queue_ms(self) -> float:
        """From the fetch to the start of execution: admission and the wait for a slot."""
        return (self.admission_ms or 0.0) + (self.slot_wait_ms or 0.0)

    @property
    def execution_ms(self) -> float:
        """Time in the engine once it ran the request (prefill and generation)."""
        if self.prefill_ms is not None or self.generation_ms is not None:
            return (self.prefill_ms or 0.0) + (self.generation_ms or 0.0)
        return max(0.0, (self.engine_ms or 0.0) - (self.slot_wait_ms or 0.0))

    def engine_ran(
        self, engine_ms: float, first_token_ms: float | None, timings: dict[str, float]
    ) -> None:
        """Split the engine's part: the scheduler's own wait for a slot and first token
        (`queued_ms`, `first_token_ms`); generation is the rest of the engine's time."""
        self.engine_ms = max(0.0, engine_ms)
        queued = timings.get("queued_ms")
        self.slot_wait_ms = max(0.0, queued) if queued is not None else None
        ran = max(0.0, self.engine_ms - (self.slot_wait_ms or 0.0))
        if first_token_ms is not None:
            self.prefill_ms = min(max(0.0, first_token_ms), ran)
            self.generation_ms = max(0.0, ran - self.prefill_ms)
        else:
            self.generation_ms = ran  # scored, not generated: one pass, no first token

    def as_fields(self) -> dict[str, float | None]:
        """The stages by their column / `meta` names, rounded to µs."""
        return {
            "bus_ms": _ms(self.bus_ms),
            "admission_ms": _ms(self.admission_ms),
            "slot_wait_ms": _ms(self.slot_wait_ms),
            "prefill_ms": _ms(self.prefill_ms),
            "generation_ms": _ms(self.generation_ms),
            "total_ms": _ms(self.total_ms),
        }


STAGE_NAMES = ("bus", "admission", "slot_wait", "prefill", "generation", "total")
"""The stages as metric attribute values (`opstream.stage.duration{stage}`)."""
STACKED_STAGES = STAGE_NAMES[:-1]
"""The stages one after another (what a stacked chart shows); `total` spans all but `bus`."""


def _ms(value: float | None) -> float | None:
    return None if value is None else round(max(0.0, value), 3)


@dataclass(frozen=True, slots=True)
class Ending:
    """How a record ended: the one account every report of it reads.

    `kind` is what happened (`ok`, `error`, `dlq`, `forwarded`, `repeat`, `replay`); `status` the
    word a reply, usage row and metric use (`ok` or `error` for anything answered);
    `code` the error code (`dlq` for a dead letter, whose reply, if any, says `validation`:
    the wire has no `dlq` code), None when ok.
    """

    kind: str
    status: str
    code: str | None

    @property
    def metric_status(self) -> str:
        """The `status` label of `opstream_requests_total`: records that ran nothing here
        (forwarded, repeat, replay) are told apart from the requests answered."""
        return self.kind if self.kind in ("forwarded", "repeat", "replay") else self.status


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
    stages: Stages = field(default_factory=Stages)
    finished_at: float = 0.0
    replayed: bool = False  # answered with the stored reply of an earlier record (see ledger)
    reservation: Reservation | None = None
    usage_receipt: Any = None  # the usage batch holding this outcome's row, once appended

    def finish(self, now: float) -> None:
        """The answer is decided at `now` (unix s): the end of `stages.total_ms`."""
        self.finished_at = now
        self.stages.total_ms = max(0.0, (now - self.record.received_at) * 1000)

    @property
    def ending(self) -> Ending:
        """How this record ended, as the reply, usage row, metrics and console line say it."""
        if self.replayed:
            return Ending("replay", self.status, self.error_code if self.status != "ok" else None)
        if self.status in ("ok", "forwarded", "repeat"):
            return Ending(self.status, self.status, None)
        if self.status == "dlq":
            return Ending("dlq", "error", "dlq")
        return Ending("error", "error", self.error_code or "internal")

    @property
    def leaves_usage_row(self) -> bool:
        """Forwarded records and repeats are logged by the record that answers them."""
        return self.status not in ("forwarded", "repeat")


class BrokerUnavailable(Exception):
    """A write the request depends on (quota state) was not acknowledged: retry the record."""

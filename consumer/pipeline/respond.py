"""Steps 5 and the DLQ: the records the pipeline writes — replies, dead letters, forwarded
copies — and the one mapping from a domain error to an error reply."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from consumer.bus.records import InboundRecord, ReplyRoute
from consumer.errors import OpstreamError, TopicMissing
from consumer.observability.tracing import inject_context
from consumer.pipeline.outcome import Outcome, RecordPublisher
from schemas.headers import (
    CHUNK_SEQ,
    CONTENT_TYPE,
    DLQ_INSTANCE,
    DLQ_ORIGIN_OFFSET,
    DLQ_ORIGIN_PARTITION,
    DLQ_ORIGIN_TOPIC,
    DLQ_REASON,
    FORWARDED_FROM,
    JSON,
    REPLAYED,
)
from schemas.replies import ErrorInfo, Meta, OperationReply, StreamChunk

log = logging.getLogger(__name__)

UnixClock = Callable[[], float]
"""Now, in unix seconds (`time.time`; tests inject their own)."""


def error_reply(exc: OpstreamError, outcome: Outcome, now: float) -> OperationReply:
    """The error reply for `exc` (and the outcome's status/code/finish time set to match)."""
    outcome.status = "error"
    outcome.error_code = exc.code
    outcome.finish(now)
    details = {k: v for k, v in exc.details.items() if k in ErrorInfo.model_fields}
    error = ErrorInfo(
        code=exc.code,
        message=exc.message,
        retryable=exc.retryable,
        http_status=exc.http_status,
        **details,
    )
    return OperationReply(status="error", error=error, meta=meta_of(outcome, now))


def reply_json(reply: OperationReply) -> str:
    """A reply as published (and as stored for retries)."""
    return reply.model_dump_json(exclude_none=True)


def replayed_reply(answer: str) -> bytes:
    """A stored reply's JSON, marked `meta.replayed: true` (its fields otherwise verbatim)."""
    body = json.loads(answer)
    body.setdefault("meta", {})["replayed"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def meta_of(outcome: Outcome, now: float) -> Meta:
    """How the request was served, for the reply's `meta`."""
    return Meta(
        operation=outcome.operation,
        model_used=outcome.model,
        input_chars=outcome.input_chars,
        input_tokens=outcome.input_tokens,
        output_tokens=outcome.output_tokens,
        queue_ms=round(outcome.stages.queue_ms, 3),
        execution_time_ms=round(outcome.stages.execution_ms, 3),
        request_id=outcome.request_id,
        timestamp=datetime.fromtimestamp(outcome.finished_at or now, UTC),
        **outcome.stages.as_fields(),
    )


class Responder:
    """Writes what the pipeline decided, each write acknowledged by the broker."""

    def __init__(
        self, publisher: RecordPublisher, *, dlq_topic: str, instance_id: str, clock: UnixClock
    ) -> None:
        self._publisher = publisher
        self._dlq_topic = dlq_topic
        self._instance_id = instance_id
        self._clock = clock

    async def reply(
        self, route: ReplyRoute, key: bytes | None, reply: OperationReply | bytes
    ) -> bool:
        """Publish `reply` (or a stored reply's JSON, replayed); False when its topic does
        not exist (or may not be written)."""
        # The reply carries the correlation header under the name the request used (Spring
        # and SmallRye match the exact bytes), on the partition it asked for, if any.
        headers = [(route.correlation_header, route.correlation), (CONTENT_TYPE, JSON.encode())]
        if isinstance(reply, bytes):
            headers.append((REPLAYED, b"true"))
        inject_context(headers)
        value = reply if isinstance(reply, bytes) else reply_json(reply).encode()
        try:
            await self._publisher.send(
                route.topic,
                value,
                key=key,
                headers=headers,
                partition=route.partition,
            )
        except TopicMissing as exc:
            log.warning("reply_topic_missing", extra={"error": str(exc)})
            return False
        return True

    async def chunk(
        self, route: ReplyRoute, key: bytes | None, seq: int, delta: str, request_id: str | None
    ) -> None:
        """Publish one chunk of a streamed reply (never logged: it is model output)."""
        headers = [
            (route.correlation_header, route.correlation),
            (CONTENT_TYPE, JSON.encode()),
            (CHUNK_SEQ, str(seq).encode()),
        ]
        body = StreamChunk(seq=seq, delta=delta, request_id=request_id)
        await self._publisher.send(
            route.topic,
            body.model_dump_json(exclude_none=True).encode(),
            key=key,
            headers=headers,
            partition=route.partition,
        )

    async def dead_letter(self, record: InboundRecord, reason: str, outcome: Outcome) -> None:
        """Copy `record` to the DLQ with where it came from and why (never its text)."""
        outcome.status = "dlq"
        outcome.error_code = "validation"
        outcome.finish(self._clock())
        headers = [
            *record.headers,
            (DLQ_ORIGIN_TOPIC, record.topic.encode()),
            (DLQ_ORIGIN_PARTITION, str(record.partition).encode()),
            (DLQ_ORIGIN_OFFSET, str(record.offset).encode()),
            (DLQ_REASON, reason.encode()),
            (DLQ_INSTANCE, self._instance_id.encode()),
        ]
        await self._publisher.send(
            self._dlq_topic, record.value or b"", key=record.key, headers=headers
        )
        log.warning(
            "request_dead_lettered",
            extra={
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "reason": reason,
            },
        )

    async def forward(self, record: InboundRecord, home: int, outcome: Outcome) -> None:
        """Copy `record` (same key, value and headers) to its tenant's partition; the
        original is committed once the copy is acknowledged, like a reply."""
        origin = f"{record.topic}/{record.partition}/{record.offset}"
        await self._publisher.send(
            record.topic,
            record.value or b"",
            key=record.key,
            headers=[*record.headers, (FORWARDED_FROM, origin.encode())],
            partition=home,
            timestamp_ms=record.timestamp_ms,  # deadlines count from the producer's write
        )
        outcome.status = "forwarded"
        outcome.finish(self._clock())
        log.debug(
            "request_forwarded",
            extra={"partition": record.partition, "offset": record.offset, "to_partition": home},
        )

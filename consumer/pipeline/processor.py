"""One record's way through the consumer, top to bottom: DESIGN's steps 0-5 in `handle`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

from opentelemetry import trace

from consumer.auth.keys import KeyRing
from consumer.bus.records import (
    InboundRecord,
    ReplyRoute,
    record_fingerprint,
    signed_routing,
)
from consumer.engine.base import (
    Engine,
    EngineError,
    EngineOverloaded,
    WorkCancelled,
    WorkExpired,
)
from consumer.errors import (
    DeadlineExceeded,
    DuplicateRequest,
    IncompleteOutput,
    InProgress,
    InternalError,
    OpstreamError,
    Overloaded,
    QuotaExceeded,
    RequestCancelled,
    ValidationFailed,
)
from consumer.observability.telemetry import Telemetry
from consumer.operations.base import AnyRequest, Prompt
from consumer.operations.registry import operation_of
from consumer.pipeline.cancels import Serving, ServingRequests
from consumer.pipeline.checks import (
    check_deadline,
    check_placement,
    work_key,
    work_of,
)
from consumer.pipeline.decode import (
    body_digest,
    parse_cancel,
    parse_request,
)
from consumer.pipeline.outcome import BrokerUnavailable, Outcome, RecordPublisher
from consumer.pipeline.respond import (
    Responder,
    UnixClock,
    error_reply,
    meta_of,
    replayed_reply,
    reply_json,
)
from consumer.pipeline.routing import DeadLetter, Forward, route_record
from consumer.pipeline.stream import ChunkStream
from consumer.quota.ledger import (
    AnsweredBefore,
    RepeatedRecord,
    Reservation,
    StillRunning,
    StoredAnswer,
)
from consumer.quota.store import QuotaStore
from consumer.settings import OperationLimits, StreamSettings
from schemas.headers import VERSION_HEADER
from schemas.replies import CancelResult, OperationReply
from topics.catalog import TopicSettings

log = logging.getLogger(__name__)

# Template and role markers a chat template adds per message, on top of the text's tokens.
_TEMPLATE_TOKENS_PER_MESSAGE = 8
_TEMPLATE_TOKENS_BASE = 16


# What a record answered without running the model is answered again when redelivered.
_UNRUN_ANSWERS: dict[str, Callable[[], OpstreamError]] = {
    "overloaded": lambda: Overloaded("the engine's queue is full; retry later"),
    "deadline_exceeded": lambda: DeadlineExceeded(
        "the deadline passed while the request waited to run"
    ),
    "cancelled": lambda: RequestCancelled("the request was cancelled by its tenant"),
}


class RequestProcessor:
    """Turns one inbound record into exactly one reply, dead letter or forwarded copy.

    Every failure a request can cause becomes an error reply; only a failure to reach the
    broker propagates, so the record stays uncommitted and is retried.
    """

    def __init__(
        self,
        *,
        engine: Engine,
        publisher: RecordPublisher,
        topics: TopicSettings,
        limits: OperationLimits,
        instance_id: str,
        keyring: KeyRing | None = None,
        quota: QuotaStore | None = None,
        telemetry: Telemetry | None = None,
        streaming: StreamSettings | None = None,
        clock: UnixClock = time.time,
    ) -> None:
        """`keyring` None turns authentication off (dev profile only); `quota` None: no quotas."""
        self._engine = engine
        # Read once: `info` builds health details (GPU memory queries on exllamav2), too much
        # for every request, and an engine's model never changes.
        self._model_name = engine.info.model
        self._topics = topics
        self._limits = limits
        self._keyring = keyring
        self._quota = quota if quota is not None and quota.settings.enabled else None
        self._telemetry = telemetry
        self._streaming = streaming or StreamSettings()
        self._serving = ServingRequests()
        self._clock = clock
        self._tracer = telemetry.tracer if telemetry else trace.get_tracer("opstream")
        self._out = Responder(publisher, dlq_topic=topics.dlq, instance_id=instance_id, clock=clock)

    async def process(self, record: InboundRecord) -> Outcome:
        """Answer `record` (or dead-letter or forward it), traced and counted."""
        if self._telemetry is None:
            return await self.handle(record)
        with self._telemetry.consume_span(
            record.headers, topic=record.topic, partition=record.partition, offset=record.offset
        ) as span:
            outcome = await self.handle(record)
            ending = outcome.ending
            span.set_attribute("opstream.status", ending.kind)
            if outcome.operation:
                span.set_attribute("opstream.operation", outcome.operation)
            if ending.code:
                span.set_attribute("opstream.error_code", ending.code)
            for name, value in outcome.stages.as_fields().items():
                if value is not None:
                    span.set_attribute(f"opstream.{name}", value)
            self._count(outcome)
            return outcome

    def _count(self, outcome: Outcome) -> None:
        assert self._telemetry is not None
        metrics = self._telemetry.metrics
        operation = outcome.operation or "unknown"
        ending = outcome.ending
        metrics.count_request(operation, ending.metric_status, ending.code)
        metrics.count_tokens(operation, outcome.input_tokens, outcome.output_tokens)
        if outcome.leaves_usage_row:  # a forwarded copy's time is counted where it is answered
            metrics.observe_stages(operation, outcome.stages.as_fields())

    async def handle(self, record: InboundRecord) -> Outcome:
        """DESIGN's steps 0-5 for one record (`route_record` decides 0-2, this carries the
        decision out); raises only when the broker is unreachable. Steps 6-7 follow in the
        intake (see the end)."""
        outcome = Outcome(record=record, status="error")
        outcome.stages.bus_ms = max(0.0, record.received_at * 1000 - record.timestamp_ms)

        decision = route_record(
            record,
            self._topics,
            tenant_partitions=self._topics.request_partitions if self._quota is not None else None,
        )
        if isinstance(decision, Forward):
            await self._out.forward(record, decision.partition, outcome)
            return outcome
        outcome.correlation_id = decision.correlation_id
        outcome.tenant_id = decision.tenant_id
        outcome.operation = decision.operation
        if isinstance(decision, DeadLetter):
            await self._out.dead_letter(record, decision.reason, outcome)
            if decision.answer_to is not None:
                problem = ValidationFailed(decision.problem or decision.reason)
                await self._out.reply(
                    decision.answer_to, record.key, error_reply(problem, outcome, self._clock())
                )
                outcome.reply_topic = decision.answer_to.topic
                outcome.status = "dlq"
            return outcome
        route, body = decision.route, decision.body
        outcome.reply_topic = route.topic

        # 2-4. Validate, authenticate, reserve quota, run: every failure is an error reply.
        #      A cancel is not run: it stops a request of its tenant that this instance serves.
        if decision.is_cancel:
            reply: OperationReply | bytes | None = await self._cancel(record, body, outcome)
        else:
            reply = await self._serve(record, body, route, outcome)
            if isinstance(reply, OperationReply) and outcome.reservation is not None:
                assert self._quota is not None
                # Kept beside the charge (persisted before the commit) for retries.
                self._quota.store_answer(outcome.reservation, reply_json(reply))

        # 5. Reply (a verbatim repeat of a taken record gets none: the original's answers).
        if reply is not None and not await self._out.reply(route, record.key, reply):
            status, code = outcome.status, outcome.error_code
            reason = f"reply topic {route.topic[:200]!r} missing"
            await self._out.dead_letter(record, reason, outcome)
            outcome.status, outcome.error_code = status, code  # served (and charged) all the same
        # 6-7 happen after this returns, in the intake: it makes the outcome durable
        # (usage/durability.py: the quota settlement persisted, the usage row on disk) and
        # then commits the offset up to the lowest unfinished record (intake/flow.py).
        return outcome

    async def _serve(
        self, record: InboundRecord, body: dict[str, Any], route: ReplyRoute, outcome: Outcome
    ) -> OperationReply | bytes | None:
        """The reply for a decodable request; the one place errors become replies."""
        serving: tuple[str, Serving] | None = None
        stream: ChunkStream | None = None
        engine_started: float | None = None
        try:
            request = parse_request(body)
            operation = operation_of(request)
            outcome.request_id = request.request_id or route.correlation_id
            outcome.tenant_id = request.tenant_id
            outcome.input_chars = request.text_chars()
            with self._tracer.start_as_current_span("opstream.auth"):
                self._authenticate(record, request)
            # Registered before the first await: a cancel later on the partition finds it.
            key = work_key(request.tenant_id, outcome.request_id)
            serving = (key, self._serving.open(key))
            with self._tracer.start_as_current_span("opstream.prompt"):
                prompt = operation.prompt(request, self._limits)
            check_deadline(request, record.timestamp_ms, self._clock())
            with self._tracer.start_as_current_span("opstream.quota"):
                # A stored reply goes only where the requester's signature says (v2 signs the
                # route; v1 does not, so a captured v1 record could redirect the answer).
                digest = body_digest(body) if self._route_signed(record) else None
                outcome.reservation = await self._reserve(record, request, prompt, outcome, digest)
            work = work_of(request, outcome.request_id, record.timestamp_ms)
            if getattr(request, "stream", False):
                stream = self._stream_to(route, record.key, outcome.request_id)
                work = replace(work, on_text=stream.push)
            if serving[1].cancel_requested:
                raise WorkCancelled("", 0, 0)
            serving[1].stage = "in_engine"
            engine_started = time.perf_counter()
            outcome.stages.admission_ms = max(0.0, (self._clock() - record.received_at) * 1000)
            with (
                self._tracer.start_as_current_span("opstream.generate") as span,
                self._in_flight(request.operation),
            ):
                served = await operation.serve(self._engine, request, prompt.tagged(work))
                outcome.stages.engine_ran(
                    served.execution_ms, served.first_token_ms, served.timings
                )
                span.set_attribute("opstream.input_tokens", served.input_tokens)
                span.set_attribute("opstream.output_tokens", served.output_tokens)
                for name, value in outcome.stages.as_fields().items():
                    if value is not None and name not in ("bus_ms", "total_ms"):
                        span.set_attribute(f"opstream.{name}", value)
        except BrokerUnavailable:
            raise
        except RepeatedRecord as exc:
            outcome.status = "repeat"
            outcome.finish(self._clock())
            log.info(
                "request_repeat_ignored",
                extra={
                    "partition": record.partition,
                    "offset": record.offset,
                    "original_status": exc.original_status,
                },
            )
            return None
        except StoredAnswer as exc:
            return self._replay(exc.answer, outcome)
        except StillRunning:
            outcome.request_id = None  # its usage row must not stand in for the original's
            running = InProgress(
                "a request with this request_id and body is still running; its reply goes "
                "to the first record's reply route, and a retry after it finished gets it"
            )
            return error_reply(running, outcome, self._clock())
        except AnsweredBefore as exc:
            # A redelivery (rebalance, crash) of a record answered without running: the same
            # answer again (the requester drops the duplicate), never a different one.
            return error_reply(_UNRUN_ANSWERS[exc.outcome](), outcome, self._clock())
        except DuplicateRequest as exc:
            outcome.request_id = None  # its usage row must not stand in for the original's
            return error_reply(exc, outcome, self._clock())
        except QuotaExceeded as exc:
            if self._telemetry is not None:
                self._telemetry.metrics.count_quota_rejection(
                    outcome.operation or "unknown", str(exc.details.get("limit_name") or "")
                )
            return error_reply(exc, outcome, self._clock())
        except IncompleteOutput as exc:
            # The model ran to max_tokens: what it generated is charged, as for an ok reply.
            outcome.input_tokens, outcome.output_tokens = exc.input_tokens, exc.output_tokens
            outcome.model = self._model_name
            if engine_started is not None:
                outcome.stages.engine_ms = (time.perf_counter() - engine_started) * 1000
            self._settle(outcome, exc.input_tokens, exc.output_tokens, exc.code, ran=True)
            return error_reply(exc, outcome, self._clock())
        # What never reached the model is released (README, Quotas); what did is charged.
        except OpstreamError as exc:
            self._settle(outcome, 0, 0, exc.code, ran=engine_started is not None)
            return error_reply(exc, outcome, self._clock())
        except WorkCancelled as exc:
            # What it generated until the cancel is what it cost: charged and counted.
            outcome.input_tokens, outcome.output_tokens = exc.input_tokens, exc.output_tokens
            if engine_started is not None:
                # How the time split between waiting and running is unknown here.
                outcome.stages.engine_ms = (time.perf_counter() - engine_started) * 1000
            outcome.model = self._model_name if exc.input_tokens else None
            ran = exc.input_tokens + exc.output_tokens > 0  # else cancelled before it started
            self._settle(
                outcome, exc.input_tokens, exc.output_tokens, RequestCancelled.code, ran=ran
            )
            stopped = RequestCancelled("the request was cancelled by its tenant")
            return error_reply(stopped, outcome, self._clock())
        except WorkExpired as exc:
            self._settle(outcome, 0, 0, DeadlineExceeded.code, ran=False)
            return error_reply(DeadlineExceeded(str(exc)), outcome, self._clock())
        except EngineOverloaded:
            self._settle(outcome, 0, 0, Overloaded.code, ran=False)
            busy = Overloaded("the engine's queue is full; retry later")
            return error_reply(busy, outcome, self._clock())
        except EngineError as exc:
            log.warning(
                "engine_failed",
                extra={"request_id": outcome.request_id, "error": type(exc).__name__},
            )
            self._settle(outcome, 0, 0, "internal", ran=engine_started is not None)
            failure = InternalError(str(exc), retryable=exc.retryable)
            return error_reply(failure, outcome, self._clock())
        except Exception:
            # A bug, not the request's fault: answer it (retryable) rather than block the partition.
            log.exception("request_failed", extra={"request_id": outcome.request_id})
            self._settle(outcome, 0, 0, "internal", ran=engine_started is not None)
            failure = InternalError("internal error while serving the request", retryable=True)
            return error_reply(failure, outcome, self._clock())
        finally:
            if serving is not None:
                serving[1].stage = "after_engine"
                self._serving.close(*serving)
            if stream is not None:
                # Every chunk is acknowledged before the final reply is published.
                await stream.close()
        outcome.status = "ok"
        outcome.model = self._model_name
        outcome.input_tokens = served.input_tokens
        outcome.output_tokens = served.output_tokens
        outcome.finish(self._clock())
        self._settle(outcome, served.input_tokens, served.output_tokens, "ok", ran=True)
        return OperationReply(
            status="ok", result=served.result, meta=meta_of(outcome, self._clock())
        )

    def _replay(self, answer: str, outcome: Outcome) -> OperationReply | bytes:
        """The stored reply of the request this record retries, marked replayed; its usage
        row counts a replay (no tokens, no model), not a second request."""
        try:
            replayed = replayed_reply(answer)
            stored = OperationReply.model_validate_json(answer)
        except ValueError:
            log.error("stored_answer_unreadable", extra={"request_id": outcome.request_id})
            failure = InternalError("the stored reply could not be read", retryable=False)
            return error_reply(failure, outcome, self._clock())
        outcome.replayed = True
        outcome.status = stored.status
        outcome.error_code = stored.error.code if stored.error else None
        outcome.finish(self._clock())
        log.info(
            "request_replayed",
            extra={
                "partition": outcome.record.partition,
                "offset": outcome.record.offset,
                "original_status": stored.error.code if stored.error else stored.status,
            },
        )
        return replayed

    async def _cancel(
        self, record: InboundRecord, body: dict[str, Any], outcome: Outcome
    ) -> OperationReply:
        """A tenant's `cancel`: stop its request with that id if this instance serves it."""
        outcome.operation = "cancel"
        # The cancel's own id (its body's request_id names the request it stops).
        outcome.request_id = outcome.correlation_id
        try:
            cancel = parse_cancel(body)
            outcome.tenant_id = cancel.tenant_id
            if self._keyring is not None:
                self._keyring.verify(
                    record.headers,
                    record.value or b"",
                    cancel.tenant_id,
                    self._clock(),
                    signed_routing(record),
                    record_timestamp_ms=record.timestamp_ms,
                    timestamp_type=record.timestamp_type,
                )
        except OpstreamError as exc:
            return error_reply(exc, outcome, self._clock())
        key = work_key(cancel.tenant_id, cancel.request_id)
        serving = self._serving.find(key)
        cancelled = False
        if serving is not None and serving.stage == "before_engine":
            serving.cancel_requested = True  # it stops before it reaches the engine
            cancelled = True
        elif serving is not None and serving.stage == "in_engine":
            cancelled = await self._engine.cancel(key)
        log.info("cancel_requested", extra={"tenant": cancel.tenant_id, "found": cancelled})
        outcome.status = "ok"
        outcome.finish(self._clock())
        result = CancelResult(request_id=cancel.request_id, cancelled=cancelled)
        return OperationReply(status="ok", result=result, meta=meta_of(outcome, self._clock()))

    def _stream_to(self, route: ReplyRoute, key: bytes | None, request_id: str) -> ChunkStream:
        async def send(seq: int, delta: str) -> None:
            await self._out.chunk(route, key, seq, delta, request_id)

        return ChunkStream(
            send,
            chunk_tokens=self._streaming.chunk_tokens,
            chunk_ms=self._streaming.chunk_ms,
        )

    def _authenticate(self, record: InboundRecord, request: AnyRequest) -> None:
        if self._keyring is None:
            return
        self._keyring.verify(
            record.headers,
            record.value or b"",
            request.tenant_id,
            self._clock(),
            signed_routing(record),
            record_timestamp_ms=record.timestamp_ms,
            timestamp_type=record.timestamp_type,
        )

    async def _reserve(
        self,
        record: InboundRecord,
        request: AnyRequest,
        prompt: Prompt,
        outcome: Outcome,
        digest: str | None,
    ) -> Reservation | None:
        """Charge the request before it runs and make the charge durable (see the quota docs)."""
        if self._quota is None:
            return None
        check_placement(record, request, self._topics.request_partitions)
        reservation = self._quota.reserve(
            record.partition,
            request.tenant_id,
            request.operation,
            outcome.request_id or "",
            self._estimate_input_tokens(prompt),
            prompt.max_tokens,
            origin=f"{record.topic}/{record.partition}/{record.offset}",
            fingerprint=record_fingerprint(record),
            body_digest=digest,
        )
        try:
            await self._quota.persist(record.partition)
        except Exception as exc:
            raise BrokerUnavailable(f"quota state not written: {exc!r}"[:300]) from exc
        return reservation

    def _route_signed(self, record: InboundRecord) -> bool:
        """Whether this record's reply route is the requester's own word: authentication off
        (development), or a v2 signature, which covers the route."""
        return self._keyring is None or record.header(VERSION_HEADER) == "2"

    def _estimate_input_tokens(self, prompt: Prompt) -> int:
        count = self._engine.count_tokens
        messages = prompt.messages
        text_tokens = sum(count(m.content) for m in messages)
        text_tokens += sum(count(c) for c in prompt.candidates)
        return text_tokens + _TEMPLATE_TOKENS_BASE + _TEMPLATE_TOKENS_PER_MESSAGE * len(messages)

    def _settle(
        self, outcome: Outcome, input_tokens: int, output_tokens: int, code: str, *, ran: bool
    ) -> None:
        # A reservation is lowered to what ran; released when the model never worked on it.
        if self._quota is not None and outcome.reservation is not None:
            self._quota.settle(outcome.reservation, input_tokens, output_tokens, code, ran=ran)

    def _in_flight(self, operation: str) -> AbstractContextManager[None]:
        if self._telemetry is None:
            return nullcontext()
        return self._telemetry.metrics.track_in_flight(operation)

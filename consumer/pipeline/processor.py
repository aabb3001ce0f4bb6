"""One request's way through the consumer: decode, check, run, reply (the processing topology)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from opentelemetry import trace
from pydantic import ValidationError

from consumer.auth.keys import KeyRing
from consumer.bus.records import (
    CONTENT_TYPE,
    CORRELATION_ID,
    DLQ_INSTANCE,
    DLQ_ORIGIN_OFFSET,
    DLQ_ORIGIN_PARTITION,
    DLQ_ORIGIN_TOPIC,
    DLQ_REASON,
    FORWARDED_FROM,
    JSON,
    REPLY_TO,
    InboundRecord,
    ReplyRoute,
    record_fingerprint,
    reply_route,
    signed_routing,
)
from consumer.engine.base import ChatMessage, Engine, EngineError, GenerationRequest
from consumer.errors import (
    DeadlineExceeded,
    DuplicateRequest,
    InternalError,
    OpstreamError,
    QuotaExceeded,
    TopicMissing,
    ValidationFailed,
)
from consumer.observability.telemetry import Telemetry, inject_context
from consumer.operations.prompts import (
    chat_prompt,
    classify_prompt,
    normalise_label_scores,
    output_budget,
    parse_summary,
    parse_translation,
    summarize_prompt,
    translate_prompt,
)
from consumer.quota.arithmetic import (
    RepeatedRecord,
    Reservation,
    partition_for_key,
    partition_for_tenant,
)
from consumer.quota.store import QuotaStore
from consumer.settings import OperationLimits
from schemas.replies import (
    HTTP_STATUS,
    AssistantMessage,
    ChatResult,
    ClassifyResult,
    ErrorInfo,
    FieldError,
    Meta,
    OperationReply,
    SummarizeResult,
    TranslateResult,
)
from schemas.requests import (
    OPERATIONS,
    ChatRequest,
    ClassifyRequest,
    SummarizeRequest,
    TranslateRequest,
    operation_request_adapter,
)
from topics.catalog import TopicSettings

log = logging.getLogger(__name__)

AnyRequest = SummarizeRequest | TranslateRequest | ClassifyRequest | ChatRequest
Result = SummarizeResult | TranslateResult | ClassifyResult | ChatResult


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


class BrokerUnavailable(Exception):
    """A write the request depends on (quota state) was not acknowledged: retry the record."""


@dataclass(frozen=True, slots=True)
class _Served:
    result: Result
    input_tokens: int
    output_tokens: int
    execution_ms: float
    first_token_ms: float | None


Clock = Callable[[], float]
# Template and role markers a chat template adds per message, on top of the text's tokens.
_TEMPLATE_TOKENS_PER_MESSAGE = 8
_TEMPLATE_TOKENS_BASE = 16


class RequestProcessor:
    """Turns one inbound record into exactly one reply or dead letter (and an `Outcome`).

    Every failure a request can cause becomes an error reply; only a failure to
    reach the broker propagates, so the record stays uncommitted and is retried.
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
        clock: Clock = time.time,
    ) -> None:
        """`keyring` None turns authentication off (dev profile only); `quota` None: no quotas."""
        self._engine = engine
        self._publisher = publisher
        self._topics = topics
        self._limits = limits
        self._instance_id = instance_id
        self._keyring = keyring
        self._quota = quota
        self._telemetry = telemetry
        self._clock = clock
        self._tracer = telemetry.tracer if telemetry else trace.get_tracer("opstream")

    async def process(self, record: InboundRecord) -> Outcome:
        """Answer `record` (or dead-letter it); raises only when the broker is unreachable."""
        if self._telemetry is None:
            return await self._process(record)
        with self._telemetry.consume_span(
            record.headers, topic=record.topic, partition=record.partition, offset=record.offset
        ) as span:
            outcome = await self._process(record)
            span.set_attribute("opstream.status", outcome.status)
            if outcome.operation:
                span.set_attribute("opstream.operation", outcome.operation)
            if outcome.error_code:
                span.set_attribute("opstream.error_code", outcome.error_code)
            self._record_metrics(outcome)
            return outcome

    def _record_metrics(self, outcome: Outcome) -> None:
        assert self._telemetry is not None
        metrics = self._telemetry.metrics
        operation = outcome.operation or "unknown"
        status = outcome.status if outcome.status in ("ok", "forwarded", "repeat") else "error"
        code = outcome.error_code if outcome.status != "dlq" else "dlq"
        metrics.count_request(operation, status, code)
        metrics.count_tokens(operation, outcome.input_tokens, outcome.output_tokens)
        total_ms = max(0.0, outcome.finished_at * 1000 - outcome.record.timestamp_ms)
        metrics.observe_latency(
            operation,
            queue_ms=outcome.queue_ms,
            first_token_ms=outcome.first_token_ms,
            total_ms=total_ms,
        )

    async def _process(self, record: InboundRecord) -> Outcome:
        outcome = Outcome(record=record, status="error")
        outcome.queue_ms = max(0.0, record.received_at * 1000 - record.timestamp_ms)
        home = self._home_partition(record)
        if home is not None:
            await self._forward(record, home, outcome)
            return outcome
        route = reply_route(record, self._topics.replies)
        outcome.correlation_id = route.correlation_id if route else None

        body, decode_error = _decode_object(record.value)
        if body is None:
            await self._dead_letter(record, f"undecodable: {decode_error}", outcome)
            if route is not None and self._topics.reply_topic_allowed(route.topic):
                await self._reply(
                    route,
                    record.key,
                    self._error_reply(
                        ValidationFailed(f"body is not a JSON object: {decode_error}"), outcome
                    ),
                )
                outcome.reply_topic = route.topic
                outcome.status = "dlq"
            return outcome

        outcome.tenant_id = _str_or_none(body.get("tenant_id"), 128)
        operation = body.get("operation")
        outcome.operation = operation if operation in OPERATIONS else None
        if route is None:
            request_id = _str_or_none(body.get("request_id"), 128)
            route = _body_route(record, request_id, self._topics.replies)
            outcome.correlation_id = request_id
        reply_to = route.topic if route else record.header(REPLY_TO) or self._topics.replies
        if not self._topics.reply_topic_allowed(reply_to):
            await self._dead_letter(
                record, f"reply_to topic '{reply_to[:200]}' is not allowed", outcome
            )
            return outcome
        if route is None:
            await self._dead_letter(record, "no correlation_id header and no request_id", outcome)
            return outcome

        outcome.reply_topic = route.topic
        reply = await self._serve(record, body, route, outcome)
        if reply is not None and not await self._reply(route, record.key, reply):
            # Served (and charged) but undeliverable: the record and the reason go to the
            # DLQ rather than blocking the partition on a topic that will not appear.
            status, code = outcome.status, outcome.error_code
            await self._dead_letter(record, f"reply topic {route.topic[:200]!r} missing", outcome)
            outcome.status, outcome.error_code = status, code
        return outcome

    def _home_partition(self, record: InboundRecord) -> int | None:
        """The tenant's partition when `record` must move there first, else None.

        Only quotas (and the replay guard that lives beside them) need a tenant's records on
        one partition. librdkafka clients (kcat, confluent-kafka, node-rdkafka) place keyed
        records with CRC32, Java with murmur2: a record on another partition than murmur2 of
        its key is forwarded there once (Kafka Streams' repartition step). A record that was
        forwarded already, or has no key, is decided here (and refused by `_reserve`).
        """
        if self._quota is None or not self._quota.settings.enabled or not record.key:
            return None
        home = partition_for_key(record.key, self._topics.request_partitions)
        if home == record.partition or record.header(FORWARDED_FROM) is not None:
            return None
        return home

    async def _forward(self, record: InboundRecord, home: int, outcome: Outcome) -> None:
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
        outcome.finished_at = self._clock()
        log.debug(
            "request_forwarded",
            extra={"partition": record.partition, "offset": record.offset, "to_partition": home},
        )

    async def _serve(
        self, record: InboundRecord, body: dict[str, Any], route: ReplyRoute, outcome: Outcome
    ) -> OperationReply | None:
        """The reply to send, or None for a verbatim repeat of a record already taken."""
        try:
            request = _parse_request(body)
            outcome.request_id = request.request_id or route.correlation_id
            outcome.tenant_id = request.tenant_id
            outcome.input_chars = request.text_chars()
            with self._tracer.start_as_current_span("opstream.auth"):
                self._authenticate(record, request)
            self._check_configured_limits(request)
            self._check_deadline(request, record)
            with self._tracer.start_as_current_span("opstream.prompt"):
                prompt = _prompt_of(request, self._limits)
            with self._tracer.start_as_current_span("opstream.quota"):
                outcome.reservation = await self._reserve(record, request, prompt, outcome)
            with (
                self._tracer.start_as_current_span("opstream.generate") as span,
                self._in_flight(request.operation),
            ):
                served = await self._run(request, prompt)
                span.set_attribute("opstream.input_tokens", served.input_tokens)
                span.set_attribute("opstream.output_tokens", served.output_tokens)
                if served.first_token_ms is not None:
                    span.set_attribute("opstream.prefill_ms", served.first_token_ms)
                    span.set_attribute(
                        "opstream.decode_ms", max(0.0, served.execution_ms - served.first_token_ms)
                    )
        except BrokerUnavailable:
            raise
        except RepeatedRecord as exc:
            # The original record's reply answers it (same correlation id and route).
            outcome.status = "repeat"
            outcome.finished_at = self._clock()
            log.info(
                "request_repeat_ignored",
                extra={
                    "partition": record.partition,
                    "offset": record.offset,
                    "original_status": exc.original_status,
                },
            )
            return None
        except DuplicateRequest as exc:
            outcome.request_id = None  # its usage row must not stand in for the original's
            return self._error_reply(exc, outcome)
        except QuotaExceeded as exc:
            if self._telemetry is not None:
                self._telemetry.metrics.count_quota_rejection(
                    outcome.operation or "unknown", str(exc.details.get("limit_name") or "")
                )
            return self._error_reply(exc, outcome)
        except OpstreamError as exc:
            self._settle_failed(outcome, exc.code)
            return self._error_reply(exc, outcome)
        except EngineError as exc:
            log.warning(
                "engine_failed",
                extra={"request_id": outcome.request_id, "error": type(exc).__name__},
            )
            self._settle_failed(outcome, "internal")
            return self._error_reply(InternalError(str(exc), retryable=exc.retryable), outcome)
        except Exception:
            # A bug, not the request's fault: answer it (retryable) rather than block the partition.
            log.exception("request_failed", extra={"request_id": outcome.request_id})
            self._settle_failed(outcome, "internal")
            return self._error_reply(
                InternalError("internal error while serving the request", retryable=True), outcome
            )
        outcome.status = "ok"
        outcome.model = self._engine.info.model
        outcome.input_tokens = served.input_tokens
        outcome.output_tokens = served.output_tokens
        outcome.execution_ms = served.execution_ms
        outcome.first_token_ms = served.first_token_ms
        outcome.finished_at = self._clock()
        if self._quota is not None and outcome.reservation is not None:
            self._quota.settle(outcome.reservation, served.input_tokens, served.output_tokens)
        return OperationReply(status="ok", result=served.result, meta=self._meta(outcome))

    def _in_flight(self, operation: str) -> AbstractContextManager[None]:
        if self._telemetry is None:
            return nullcontext()
        return self._telemetry.metrics.track_in_flight(operation)

    def _authenticate(self, record: InboundRecord, request: AnyRequest) -> None:
        if self._keyring is None:
            return
        self._keyring.verify(
            record.headers,
            record.value or b"",
            request.tenant_id,
            self._clock(),
            signed_routing(record),
        )

    async def _reserve(
        self, record: InboundRecord, request: AnyRequest, prompt: _Prompt, outcome: Outcome
    ) -> Reservation | None:
        """Charge the request before it runs and make the charge durable (see the quota docs)."""
        quota = self._quota
        if quota is None or not quota.settings.enabled:
            return None
        key_error = [
            FieldError(loc=["key"], msg="the record key must be the tenant_id", type="key")
        ]
        if record.key != request.tenant_id.encode():
            problem = "has no key" if not record.key else "is keyed by another value"
            raise ValidationFailed(
                f"the record {problem}: key requests by their tenant_id, so that one "
                "partition counts each tenant's quota",
                errors=key_error,
            )
        expected = partition_for_tenant(request.tenant_id, self._topics.request_partitions)
        if record.partition != expected:
            # Only a record that was forwarded already gets here (see `_home_partition`):
            # the request topic's partition count differs from `topics.request_partitions`.
            raise ValidationFailed(
                f"request for tenant {request.tenant_id!r} arrived on partition "
                f"{record.partition}, not {expected}, after being forwarded once: "
                "the request topic's partition count does not match the consumer's settings",
                errors=key_error,
            )
        input_tokens = self._estimate_input_tokens(prompt)
        reservation = quota.reserve(
            record.partition,
            request.tenant_id,
            request.operation,
            outcome.request_id or "",
            input_tokens,
            prompt.max_tokens,
            origin=f"{record.topic}/{record.partition}/{record.offset}",
            fingerprint=record_fingerprint(record),
        )
        try:
            await quota.persist(record.partition)
        except Exception as exc:
            raise BrokerUnavailable(f"quota state not written: {exc!r}"[:300]) from exc
        return reservation

    def _estimate_input_tokens(self, prompt: _Prompt) -> int:
        count = self._engine.count_tokens
        messages = prompt.messages
        text_tokens = sum(count(m.content) for m in messages)
        text_tokens += sum(count(c) for c in prompt.candidates)
        return text_tokens + _TEMPLATE_TOKENS_BASE + _TEMPLATE_TOKENS_PER_MESSAGE * len(messages)

    def _settle_failed(self, outcome: Outcome, code: str) -> None:
        # Reserved but not served (engine failure, deadline): charge the request, no tokens.
        if self._quota is not None and outcome.reservation is not None:
            self._quota.settle(outcome.reservation, 0, 0, code)

    async def _run(self, request: AnyRequest, prompt: _Prompt) -> _Served:
        engine = self._engine
        started = time.perf_counter()
        result: Result
        if isinstance(request, ClassifyRequest):
            scores = await engine.score(prompt.messages, prompt.candidates)
            verdict = normalise_label_scores(request.categories, scores.logprobs)
            result = ClassifyResult(
                label=verdict.label, confidence=verdict.confidence, scores=verdict.scores
            )
            elapsed = (time.perf_counter() - started) * 1000
            return _Served(result, scores.input_tokens, 0, elapsed, None)
        assert prompt.generation is not None
        generation = await engine.generate(prompt.generation)
        if isinstance(request, SummarizeRequest):
            summary = parse_summary(generation.text, request.max_sentences)
            result = SummarizeResult(summary=summary.text, sentence_count=summary.sentence_count)
        elif isinstance(request, TranslateRequest):
            result = TranslateResult(
                translated_text=parse_translation(generation.text),
                source_language=request.source_language,
                target_language=request.target_language,
            )
        else:
            result = ChatResult(
                message=AssistantMessage(content=generation.text),
                finish_reason=generation.finish_reason,
            )
        elapsed = (time.perf_counter() - started) * 1000
        return _Served(
            result,
            generation.input_tokens,
            generation.output_tokens,
            elapsed,
            generation.first_token_ms,
        )

    def _check_configured_limits(self, request: AnyRequest) -> None:
        if not isinstance(request, ChatRequest):
            return
        limits = self._limits
        problems: list[FieldError] = []
        if len(request.messages) > limits.chat_max_messages:
            problems.append(
                FieldError(
                    loc=["messages"],
                    msg=f"at most {limits.chat_max_messages} messages are allowed",
                    type="too_long",
                )
            )
        if request.text_chars() > limits.chat_max_input_chars:
            problems.append(
                FieldError(
                    loc=["messages"],
                    msg=f"messages may hold at most {limits.chat_max_input_chars} characters",
                    type="too_long",
                )
            )
        if request.max_tokens is not None and request.max_tokens > limits.chat_max_output_tokens:
            problems.append(
                FieldError(
                    loc=["max_tokens"],
                    msg=f"max_tokens must be <= {limits.chat_max_output_tokens} for chat",
                    type="less_than_equal",
                )
            )
        if problems:
            raise ValidationFailed("request exceeds the configured chat limits", errors=problems)

    def _check_deadline(self, request: AnyRequest, record: InboundRecord) -> None:
        deadline = deadline_of(request, record.timestamp_ms)
        if deadline is None:
            return
        now = datetime.fromtimestamp(self._clock(), UTC)
        if now >= deadline:
            late_ms = int((now - deadline).total_seconds() * 1000)
            raise DeadlineExceeded(f"the deadline passed {late_ms} ms before the request could run")

    def _error_reply(self, exc: OpstreamError, outcome: Outcome) -> OperationReply:
        outcome.status = "error"
        outcome.error_code = exc.code
        outcome.finished_at = self._clock()
        details = {k: v for k, v in exc.details.items() if k in ErrorInfo.model_fields}
        error = ErrorInfo(
            code=exc.code,
            message=exc.message,
            retryable=exc.retryable,
            http_status=HTTP_STATUS.get(exc.code, 500),
            **details,
        )
        return OperationReply(status="error", error=error, meta=self._meta(outcome))

    def _meta(self, outcome: Outcome) -> Meta:
        return Meta(
            operation=outcome.operation,
            model_used=outcome.model,
            input_chars=outcome.input_chars,
            input_tokens=outcome.input_tokens,
            output_tokens=outcome.output_tokens,
            queue_ms=round(outcome.queue_ms, 3),
            execution_time_ms=round(outcome.execution_ms, 3),
            request_id=outcome.request_id,
            timestamp=datetime.fromtimestamp(outcome.finished_at or self._clock(), UTC),
        )

    async def _reply(self, route: ReplyRoute, key: bytes | None, reply: OperationReply) -> bool:
        """Publish `reply`; False when its topic does not exist (or may not be written)."""
        # The reply carries the correlation header under the name the request used (Spring
        # and SmallRye match the exact bytes), on the partition it asked for, if any.
        headers = [
            (route.correlation_header, route.correlation),
            (CONTENT_TYPE, JSON.encode()),
        ]
        inject_context(headers)
        try:
            await self._publisher.send(
                route.topic,
                reply.model_dump_json(exclude_none=True).encode(),
                key=key,
                headers=headers,
                partition=route.partition,
            )
        except TopicMissing as exc:
            log.warning("reply_topic_missing", extra={"error": str(exc)})
            return False
        return True

    async def _dead_letter(self, record: InboundRecord, reason: str, outcome: Outcome) -> None:
        outcome.status = "dlq"
        outcome.dlq_reason = reason
        outcome.error_code = "validation"
        outcome.finished_at = self._clock()
        headers = [
            *record.headers,
            (DLQ_ORIGIN_TOPIC, record.topic.encode()),
            (DLQ_ORIGIN_PARTITION, str(record.partition).encode()),
            (DLQ_ORIGIN_OFFSET, str(record.offset).encode()),
            (DLQ_REASON, reason.encode()),
            (DLQ_INSTANCE, self._instance_id.encode()),
        ]
        await self._publisher.send(
            self._topics.dlq, record.value or b"", key=record.key, headers=list(headers)
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


@dataclass(frozen=True, slots=True)
class _Prompt:
    """What the engine is asked: a generation, or messages and candidates to score."""

    messages: tuple[ChatMessage, ...]
    max_tokens: int
    generation: GenerationRequest | None = None
    candidates: tuple[str, ...] = ()


def _prompt_of(request: AnyRequest, limits: OperationLimits) -> _Prompt:
    if isinstance(request, ClassifyRequest):
        return _Prompt(classify_prompt(request), 0, candidates=tuple(request.categories))
    if isinstance(request, SummarizeRequest):
        generation = summarize_prompt(request, output_budget("summarize", request.max_tokens))
    elif isinstance(request, TranslateRequest):
        generation = translate_prompt(request, output_budget("translate", request.max_tokens))
    else:
        budget = output_budget("chat", request.max_tokens, limits.chat_max_output_tokens)
        generation = chat_prompt(request, budget)
    return _Prompt(generation.messages, generation.max_tokens, generation=generation)


def deadline_of(request: AnyRequest, produced_at_ms: int) -> datetime | None:
    """The earlier of the absolute `deadline` and `timeout_ms` after the record was produced."""
    candidates = []
    if request.deadline is not None:
        candidates.append(request.deadline.astimezone(UTC))
    if request.timeout_ms is not None:
        produced = datetime.fromtimestamp(produced_at_ms / 1000, UTC)
        candidates.append(produced + timedelta(milliseconds=request.timeout_ms))
    return min(candidates) if candidates else None


def _parse_request(body: dict[str, Any]) -> AnyRequest:
    try:
        return operation_request_adapter.validate_python(body)
    except ValidationError as exc:
        raise ValidationFailed(
            f"request is invalid ({exc.error_count()} error(s))", errors=field_errors(exc)
        ) from None


def field_errors(exc: ValidationError) -> list[FieldError]:
    """Field errors without the offending input values (they may be prompt text)."""
    return [
        FieldError(
            loc=[str(p) if not isinstance(p, int) else p for p in e["loc"]],
            msg=e["msg"],
            type=e["type"],
        )
        for e in exc.errors(include_input=False, include_url=False, include_context=False)
    ]


def _decode_object(value: bytes | None) -> tuple[dict[str, Any] | None, str]:
    if not value:
        return None, "empty body"
    try:
        decoded = json.loads(value)
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 (byte {exc.start})"
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        return None, "JSON nested too deeply"
    if not isinstance(decoded, dict):
        return None, f"JSON {type(decoded).__name__} is not an object"
    return decoded, ""


def _body_route(
    record: InboundRecord, request_id: str | None, default_topic: str
) -> ReplyRoute | None:
    """The route of a request without a correlation header: its request_id correlates."""
    if request_id is None:
        return None
    requested = record.header(REPLY_TO)
    return ReplyRoute(
        topic=requested or default_topic,
        requested_topic=requested,
        partition=None,
        correlation_header=CORRELATION_ID,
        correlation=request_id.encode(),
        correlation_id=request_id,
    )


def _str_or_none(value: object, max_len: int) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= max_len else None

"""The app factory: wires broker, intake, pipeline, engine, quotas, usage and HTTP in one place."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from faststream import AckPolicy
from faststream.asgi import AsgiFastStream
from faststream.kafka import KafkaBroker, KafkaMessage

from consumer.auth.keys import KeyRing, auth_required
from consumer.bus.publisher import KafkaRecordPublisher
from consumer.bus.records import InboundRecord, as_headers, is_utf8
from consumer.bus.security import aiokafka_security_kwargs, faststream_security
from consumer.bus.unreadable import UnreadableBatches
from consumer.engine.base import Engine, EngineInfo
from consumer.engine.factory import load_engine
from consumer.engine.scheduler.policy import Load
from consumer.intake.assignment import GroupOffsets, PartitionOwner
from consumer.intake.flow import Intake
from consumer.intake.offsets import Partition
from consumer.observability.health import HealthReporter, health_routes
from consumer.observability.telemetry import Telemetry
from consumer.pipeline import Outcome, RequestProcessor
from consumer.quota.runtime import QuotaRuntime
from consumer.quota.store import DayClock
from consumer.settings import Settings
from consumer.usage.rows import usage_row
from consumer.usage.writer import UsageReceipt, UsageWriter
from schemas.replies import OperationReply, StreamChunk
from schemas.requests import OperationRequest

log = logging.getLogger(__name__)


class Service:
    """Everything one consumer instance runs, started and stopped with the FastStream app."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        *,
        telemetry: Telemetry | None = None,
        quota_clock: DayClock | None = None,
    ) -> None:
        if not settings.kafka.bootstrap_servers:
            raise ValueError("kafka.bootstrap_servers is not set (or use `opstream dev`)")
        self.settings = settings
        self.engine = engine
        self.started_at = time.time()
        self.security = aiokafka_security_kwargs(settings.security)
        self.publisher = KafkaRecordPublisher(
            settings.kafka.bootstrap_servers,
            settings.kafka.client_id,
            request_timeout_ms=settings.kafka.request_timeout_ms,
            **self.security,
        )
        self.telemetry = telemetry or Telemetry(
            settings.telemetry, instance_id=settings.instance_id
        )
        self.keyring: KeyRing | None = None
        if auth_required(settings):
            self.keyring = KeyRing.from_settings(settings.auth)
        self.quota: QuotaRuntime | None = None
        if settings.quota.enabled:
            self.quota = QuotaRuntime(settings, clock=quota_clock, client_options=self.security)
        self.usage: UsageWriter | None = None
        if settings.usage.enabled:
            # The writer also runs periodic compaction when usage.compact_interval_s > 0.
            self.usage = UsageWriter(settings.usage, settings.instance_id)
        self.intake: Intake | None = None
        self.offsets = GroupOffsets()
        # A batch that cannot be read pauses its partition, not the whole consume loop.
        self.unreadable = UnreadableBatches(self.telemetry.metrics)
        self.owner = PartitionOwner(
            requests_topic=settings.topics.requests,
            state=self.quota.store if self.quota is not None else None,
            drain_timeout_s=settings.intake.shutdown_grace_s,
        )
        self.health = HealthReporter(
            started_at=self.started_at,
            engine_info=self.engine_info,
            broker_status=lambda: self.publisher.connected,
            assigned_partitions=lambda: self.assigned,
            unreadable_batches=self.unreadable.health_entries,
        )

    @property
    def assigned(self) -> set[Partition]:
        """The partitions this instance owns now."""
        return self.owner.assigned

    def engine_info(self) -> EngineInfo | None:
        return self.engine.info if self.engine is not None else None

    async def start(self) -> None:
        if self.keyring is None:
            # Loud on purpose: requests are not checked for a tenant signature.
            log.warning(
                "authentication_off",
                extra={"profile": self.settings.profile, "auth_required": False},
            )
        if self.engine is None:
            # Loading a model blocks for seconds to minutes; keep the loop responsive.
            self.engine = await asyncio.to_thread(load_engine, self.settings)
        self.engine.on_batch = self.telemetry.metrics.batch_observer(self.engine.info.backend)
        await self.publisher.start()
        if self.quota is not None:
            await self.quota.start()
        if self.usage is not None:
            await self.usage.start()
        engine = self.engine
        processor = RequestProcessor(
            engine=engine,
            publisher=self.publisher,
            topics=self.settings.topics,
            limits=self.settings.limits,
            instance_id=self.settings.instance_id,
            keyring=self.keyring,
            quota=self.quota.store if self.quota is not None else None,
            telemetry=self.telemetry,
            streaming=self.settings.streaming,
        )
        self.intake = Intake(
            processor.process,
            self.offsets.commit,
            max_in_flight=in_flight_bound(self.settings, engine.load()),
            commit_interval_s=self.settings.intake.commit_interval_ms / 1000,
            make_durable=self._make_durable,
            flush=self.usage.flush if self.usage is not None else None,
            queued=engine.queued_callers,
        )
        self.owner.intake = self.intake
        self.intake.on_abandoned.append(self.telemetry.metrics.count_abandoned)
        if self.settings.logging.format == "console":
            # A person is watching: one line per request. JSON logs leave this to the
            # usage rows and metrics, which already carry it.
            self.intake.on_outcome.append(log_request_finished)
        self.intake.start()
        self.telemetry.metrics.set_lag_source(lambda: self.offsets.lag(self.owner))
        self.telemetry.metrics.set_engine_info_source(self.engine_info)
        info = self.engine.info
        log.info(
            "service_started",
            extra={
                "instance_id": self.settings.instance_id,
                "backend": info.backend,
                "model": info.model,
                "auth": self.keyring is not None,
                "quota": self.quota is not None,
                "usage": self.usage is not None,
            },
        )

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.offsets.pause_all()  # stop fetching first
        if self.intake is not None:
            await self.intake.close(self.settings.intake.shutdown_grace_s)
        if self.usage is not None:
            await self.usage.close()
        if self.quota is not None:
            await self.quota.stop()
        await self.publisher.stop()
        if self.engine is not None:
            await self.engine.close()
        self.telemetry.shutdown()
        log.info("service_stopped", extra={"instance_id": self.settings.instance_id})

    def bind_subscriber(self, subscriber: Any) -> None:
        """Commits go through the subscriber's own aiokafka consumer (built when it starts);
        its fetches go through `unreadable.guard` (FastStream's loop calls `get_msg`)."""
        self._subscriber = subscriber
        subscriber.get_msg = self.unreadable.guard(subscriber.get_msg)

    async def after_broker_started(self) -> None:
        self.offsets.consumer = self._subscriber.consumer

    async def submit(self, raw: Any) -> None:
        """Take one aiokafka ConsumerRecord (the subscriber is not batched)."""
        assert self.intake is not None, "service not started"
        record = InboundRecord(
            topic=raw.topic,
            partition=raw.partition,
            offset=raw.offset,
            key=raw.key,
            value=raw.value,
            headers=as_headers(raw.headers or ()),
            timestamp_ms=raw.timestamp,
            received_at=time.time(),
            timestamp_type=raw.timestamp_type,
        )
        await self.intake.submit(record)

    async def _make_durable(self, outcome: Outcome) -> None:
        """The quota settlement is in Kafka and the usage row on disk (before the commit)."""
        if self.quota is not None and outcome.reservation is not None:
            await self.quota.store.persist(outcome.record.partition)
        if outcome.status in ("forwarded", "repeat"):
            return  # the record that answers it leaves the usage row
        if self.usage is not None:
            receipt: UsageReceipt | None = getattr(outcome, "usage_receipt", None)
            if receipt is None or (receipt.done() and receipt.error is not None):
                receipt = self.usage.append_nowait(usage_row(outcome, self.settings.instance_id))
                outcome.usage_receipt = receipt
            await receipt.wait()


def log_request_finished(outcome: Outcome) -> None:
    """One console line per answered, rejected or dead-lettered request (never its text)."""
    if not outcome.leaves_usage_row:
        return  # forwarded or a repeat: the record that answers it logs the line
    ending = outcome.ending
    fields: dict[str, Any] = {
        "tenant": outcome.tenant_id,
        "operation": outcome.operation,
        "status": ending.status,
    }
    if ending.code is not None:
        fields["code"] = ending.code
    fields["input_tokens"] = outcome.input_tokens
    fields["output_tokens"] = outcome.output_tokens
    # As the usage row and reply meta count it: from the fetch to the reply.
    fields["total_ms"] = round(outcome.stages.total_ms)
    log.log(
        logging.INFO if ending.status == "ok" else logging.WARNING,
        "request_finished",
        extra=fields,
    )


def in_flight_bound(settings: Settings, load: Load) -> int:
    """`intake.max_in_flight`, or twice what the engine's scheduler holds (slots + queue).

    Up to slots + queue records wait in the scheduler, ordered fairly between tenants; the
    intake takes as many again, which the full queue answers `overloaded` at once (retryable,
    not charged), so a flood learns it is one instead of waiting unseen; past the bound the
    fetch stops and the rest waits in Kafka. A revoke or shutdown hands every record whose
    work has not started back to Kafka at once and waits only for running work (`Intake`),
    so a deep queue never holds a drain beyond the grace.
    """
    if settings.intake.max_in_flight is not None:
        return settings.intake.max_in_flight
    return max(1, 2 * (load.slots + load.queue_limit))


async def _lenient_headers(record: Any, original: Callable[[Any], Awaitable[Any]]) -> Any:
    """FastStream's parser, tolerant of header values that are not UTF-8 (or are null).

    FastStream decodes every header value as strict UTF-8 for its own use; a record with
    any other header never reached the handler, so its offset was committed past with no
    reply, dead letter or usage row. It parses a lenient copy here; the handler still gets
    the original record (the pipeline reads the raw header bytes itself).
    """
    headers = record.headers or ()
    if all(isinstance(value, bytes) and is_utf8(value) for _, value in headers):
        return await original(record)
    lenient = tuple(
        (key, (value or b"").decode("utf-8", "replace").encode()) for key, value in headers
    )
    message = await original(dataclasses.replace(record, headers=lenient))
    message.raw_message = record
    return message


async def _raw_record(message: KafkaMessage) -> Any:
    """The subscriber's decoder: hand the pipeline the record itself (it decodes the body)."""
    return message.raw_message


def make_broker(settings: Settings, service: Service | None = None) -> KafkaBroker:
    """The broker with the request subscriber and the documented publishers.

    Without a `service` the broker only describes the app (for the AsyncAPI document).
    """
    kafka = settings.kafka
    broker = KafkaBroker(
        kafka.bootstrap_servers or "localhost:9092",
        client_id=kafka.client_id,
        request_timeout_ms=kafka.request_timeout_ms,
        graceful_timeout=settings.intake.shutdown_grace_s,
        security=faststream_security(settings.security),
        # FastStream's per-message "Received/Processed" lines go to our handlers at DEBUG.
        logger=logging.getLogger("opstream.faststream"),
        log_level=logging.DEBUG,
        # No dependency injection on the hot path: resolving a `KafkaMessage` parameter
        # hops to a worker thread per record (measured: most of the per-record cost).
        apply_types=False,
    )
    subscriber = broker.subscriber(
        settings.topics.requests,
        group_id=kafka.group_id,
        ack_policy=AckPolicy.MANUAL,
        auto_offset_reset=kafka.auto_offset_reset,
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
        session_timeout_ms=kafka.session_timeout_ms,
        heartbeat_interval_ms=kafka.heartbeat_interval_ms,
        max_poll_interval_ms=kafka.max_poll_interval_ms,
        listener=service.owner if service is not None else None,
        # Our `reply_to` header is ours to honour; FastStream must not answer it too.
        no_reply=True,
        decoder=_raw_record,
        parser=_lenient_headers,
        title="operation requests",
        description=(
            "Operation requests keyed by tenant_id. Headers: correlation_id, reply_to "
            "(default ops.replies.v1), traceparent, x-opstream-key-id/-timestamp/-signature. "
            "Body: OperationRequest, or CancelRequest (operation 'cancel')."
        ),
    )

    @subscriber
    async def handle_request(record: Any) -> None:
        """Hand the record to the intake; offsets are committed by the intake, not here."""
        if service is None:
            raise RuntimeError("documentation-only broker")
        await service.submit(record)

    if service is not None:
        service.bind_subscriber(subscriber)

    # Documentation of what the service publishes (it sends through its own producer,
    # so offsets can wait for the broker's acknowledgement).
    broker.publisher(
        settings.topics.replies,
        title="operation replies",
        description="Replies matched by the correlation_id header (or the request's reply_to). "
        "A request with stream=true first gets StreamChunk records (status 'chunk', header "
        "x-opstream-chunk-seq), then its OperationReply.",
        schema=OperationReply | StreamChunk,
    )
    broker.publisher(
        settings.topics.dlq,
        title="dead letters",
        description="Undecodable or unroutable requests, with x-opstream-dlq-* origin headers.",
        schema=OperationRequest,
    )
    return broker


def asyncapi_document(settings: Settings) -> dict[str, Any]:
    """The AsyncAPI document FastStream generates for the app (no connection is made)."""
    from faststream.specification import AsyncAPI

    spec = AsyncAPI(make_broker(settings), title="opstream", version="1.0.0")
    return json.loads(spec.to_specification().to_json())


def build_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    telemetry: Telemetry | None = None,
    quota_clock: DayClock | None = None,
) -> AsgiFastStream:
    """The FastStream application for `settings` (tests may inject an engine or telemetry)."""
    service = Service(settings, engine, telemetry=telemetry, quota_clock=quota_clock)
    broker = make_broker(settings, service)
    routes: list[tuple[str, Any]] = [*health_routes(service.health)]
    routes.append(("/metrics", service.telemetry.metrics_asgi()))
    if service.quota is not None:
        routes.extend(service.quota.admin_routes())
    app = AsgiFastStream(
        broker,
        asgi_routes=routes,
        # Its "app starting…" lines through our handlers, not FastStream's own coloured one.
        logger=logging.getLogger("opstream.faststream"),
        on_startup=[service.start],
        after_startup=[service.after_broker_started],
        on_shutdown=[service.stop],
    )
    app.context.set_global("service", service)
    return app

"""The app factory: wires broker, intake, pipeline, engine, quotas, usage and HTTP in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from faststream import AckPolicy
from faststream.asgi import AsgiFastStream
from faststream.kafka import KafkaBroker

from consumer.auth.keys import KeyRing, auth_required
from consumer.bus import asyncapi
from consumer.bus.connection import KafkaConnection
from consumer.bus.parser import lenient_headers, raw_record
from consumer.bus.publisher import KafkaRecordPublisher
from consumer.bus.records import inbound_record
from consumer.bus.security import faststream_security
from consumer.bus.unreadable import UnreadableBatches
from consumer.engine.base import Engine, EngineInfo
from consumer.engine.factory import load_engine
from consumer.intake.assignment import GroupOffsets, PartitionOwner
from consumer.intake.flow import Intake
from consumer.intake.offsets import Partition
from consumer.intake.sizing import in_flight_bound
from consumer.observability.console import log_request_finished
from consumer.observability.health import HealthReporter, health_routes
from consumer.observability.logging import FASTSTREAM_LOGGER
from consumer.observability.telemetry import Telemetry
from consumer.pipeline.processor import RequestProcessor
from consumer.quota.runtime import QuotaRuntime
from consumer.quota.store import DayClock
from consumer.settings import Settings
from consumer.usage.durability import MakeDurable
from consumer.usage.writer import UsageWriter
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
        self.connection = KafkaConnection.of(settings.kafka.bootstrap_servers, settings.security)
        self.publisher = KafkaRecordPublisher(
            self.connection,
            settings.kafka.client_id,
            request_timeout_ms=settings.kafka.request_timeout_ms,
        )
        self.telemetry = telemetry or Telemetry(
            settings.telemetry, instance_id=settings.instance_id
        )
        self.keyring: KeyRing | None = None
        if auth_required(settings):
            self.keyring = KeyRing.from_settings(settings.auth)
        self.quota: QuotaRuntime | None = None
        if settings.quota.enabled:
            self.quota = QuotaRuntime(settings, self.connection, clock=quota_clock)
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
            max_in_flight=in_flight_bound(self.settings.intake.max_in_flight, engine.load()),
            commit_interval_s=self.settings.intake.commit_interval_ms / 1000,
            make_durable=MakeDurable(
                quota=self.quota.store if self.quota is not None else None,
                usage=self.usage,
                instance_id=self.settings.instance_id,
            ),
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
        await self.intake.submit(inbound_record(raw, received_at=time.time()))


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
        logger=logging.getLogger(FASTSTREAM_LOGGER),
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
        decoder=raw_record,
        parser=lenient_headers,
        title=asyncapi.REQUESTS.title,
        description=asyncapi.REQUESTS.description,
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
        title=asyncapi.REPLIES.title,
        description=asyncapi.REPLIES.description,
        schema=OperationReply | StreamChunk,
    )
    broker.publisher(
        settings.topics.dlq,
        title=asyncapi.DEAD_LETTERS.title,
        description=asyncapi.DEAD_LETTERS.description,
        schema=OperationRequest,
    )
    return broker


def asyncapi_document(settings: Settings) -> dict[str, Any]:
    """The AsyncAPI document of the app `settings` describe (no connection is made)."""
    return asyncapi.asyncapi_document(make_broker(settings))


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
        logger=logging.getLogger(FASTSTREAM_LOGGER),
        on_startup=[service.start],
        after_startup=[service.after_broker_started],
        on_shutdown=[service.stop],
    )
    app.context.set_global("service", service)
    return app

"""The app factory: wires broker, intake, pipeline, engine and HTTP routes in one place."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from faststream import AckPolicy
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.kafka import KafkaBroker, KafkaMessage

from consumer.engine.base import Engine
from consumer.engine.factory import load_engine
from consumer.intake import Intake
from consumer.kafka_io import KafkaRecordPublisher
from consumer.offsets import Partition
from consumer.pipeline import RequestProcessor
from consumer.records import InboundRecord, as_headers
from consumer.settings import Settings
from schemas.replies import OperationReply
from schemas.requests import OperationRequest

log = logging.getLogger(__name__)


class Service:
    """Everything one consumer instance runs, started and stopped with the FastStream app."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        if not settings.kafka.bootstrap_servers:
            raise ValueError("kafka.bootstrap_servers is not set (or use `opstream dev`)")
        self.settings = settings
        self.engine = engine
        self.started_at = time.time()
        self.assigned: set[Partition] = set()
        self.publisher = KafkaRecordPublisher(
            settings.kafka.bootstrap_servers, settings.kafka.client_id
        )
        self.consumer: Any = None  # aiokafka consumer, known once the subscriber starts
        self.intake: Intake | None = None

    async def start(self) -> None:
        if self.engine is None:
            # Loading a model blocks for seconds to minutes; keep the loop responsive.
            self.engine = await asyncio.to_thread(load_engine, self.settings)
        await self.publisher.start()
        processor = RequestProcessor(
            engine=self.engine,
            publisher=self.publisher,
            topics=self.settings.topics,
            limits=self.settings.limits,
            instance_id=self.settings.instance_id,
        )
        self.intake = Intake(
            processor.process,
            self._commit,
            max_in_flight=self.settings.intake.max_in_flight,
            commit_interval_s=self.settings.intake.commit_interval_ms / 1000,
        )
        self.intake.start()
        info = self.engine.info
        log.info(
            "service_started",
            extra={
                "instance_id": self.settings.instance_id,
                "backend": info.backend,
                "model": info.model,
            },
        )

    async def stop(self) -> None:
        if self.intake is not None:
            await self.intake.close(self.settings.intake.shutdown_grace_s)
        await self.publisher.stop()
        if self.engine is not None:
            await self.engine.close()
        log.info("service_stopped", extra={"instance_id": self.settings.instance_id})

    async def submit(self, message: KafkaMessage) -> None:
        raw = message.raw_message
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
        )
        await self.intake.submit(record)

    async def _commit(self, positions: dict[Partition, int]) -> None:
        if self.consumer is None:
            raise RuntimeError("consumer not started")
        await self.consumer.commit({TopicPartition(t, p): o for (t, p), o in positions.items()})

    def ready(self) -> bool:
        return self.engine is not None and self.engine.info.loaded and bool(self.assigned)

    def health(self) -> dict[str, Any]:
        info = self.engine.info if self.engine is not None else None
        return {
            "status": "healthy" if info and info.loaded else "starting",
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "instance_id": self.settings.instance_id,
            "models": [{"name": info.model, "backend": info.backend, "loaded": info.loaded}]
            if info
            else [],
            "partitions": sorted(p for _, p in self.assigned),
            "in_flight": self.intake.in_flight if self.intake else 0,
        }


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: Service) -> None:
        self._service = service

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        partitions = {(tp.topic, tp.partition) for tp in revoked}
        if self._service.intake is not None and partitions:
            await self._service.intake.revoke(
                partitions, self._service.settings.intake.shutdown_grace_s
            )
        self._service.assigned -= partitions

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._service.assigned |= {(tp.topic, tp.partition) for tp in assigned}
        log.info(
            "partitions_assigned", extra={"partitions": sorted(tp.partition for tp in assigned)}
        )


def build_app(settings: Settings, engine: Engine | None = None) -> AsgiFastStream:
    """The FastStream application for `settings` (an `engine` may be injected by tests)."""
    service = Service(settings, engine)
    kafka = settings.kafka
    broker = KafkaBroker(
        kafka.bootstrap_servers,
        client_id=kafka.client_id,
        request_timeout_ms=kafka.request_timeout_ms,
        graceful_timeout=settings.intake.shutdown_grace_s,
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
        listener=_Rebalance(service),
        title="operation requests",
        description=(
            "Operation requests keyed by tenant_id. Headers: correlation_id, reply_to "
            "(default ops.replies.v1), traceparent, tenant signature. Body: OperationRequest."
        ),
    )

    @subscriber
    async def handle_request(message: KafkaMessage) -> None:
        """Hand the record to the intake; offsets are committed by the intake, not here."""
        if service.consumer is None:
            service.consumer = subscriber.consumer
        await service.submit(message)

    # Documentation of what the service publishes (it sends through its own producer,
    # so offsets can wait for the broker's acknowledgement).
    broker.publisher(
        settings.topics.replies,
        title="operation replies",
        description="Replies matched by the correlation_id header (or the request's reply_to).",
        schema=OperationReply,
    )
    broker.publisher(
        settings.topics.dlq,
        title="dead letters",
        description="Undecodable or unroutable requests, with x-opstream-dlq-* origin headers.",
        schema=OperationRequest,
    )

    @get(include_in_schema=False)
    async def health() -> AsgiResponse:
        return AsgiResponse(json.dumps(service.health()).encode(), 200, {"content-type": JSON_TYPE})

    @get(include_in_schema=False)
    async def ready() -> AsgiResponse:
        ok = service.ready()
        body = json.dumps({"ready": ok, "partitions": len(service.assigned)}).encode()
        return AsgiResponse(body, 200 if ok else 503, {"content-type": JSON_TYPE})

    app = AsgiFastStream(
        broker,
        asgi_routes=[("/health", health), ("/ready", ready)],
        on_startup=[service.start],
        on_shutdown=[service.stop],
    )
    app.context.set_global("service", service)
    return app


JSON_TYPE = "application/json"

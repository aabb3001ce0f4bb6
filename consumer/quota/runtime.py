"""Quotas in a running consumer: limit book, follower, state store and publisher, wired once."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from consumer.bus.connection import KafkaConnection
from consumer.quota.admin import AdminHandler, admin_routes
from consumer.quota.control import LimitCommandPublisher, LimitFollower
from consumer.quota.limit_book import LimitBook, limit_defaults
from consumer.quota.store import DayClock, QuotaStore, make_state_producer, offset_clock
from consumer.settings import Settings


class QuotaRuntime:
    """Everything quotas need in one consumer instance, started and stopped together.

    Start it in the app's lifespan before consuming; call `store.restore`/`store.forget`
    from the rebalance listener. A producer passed in is the caller's to start and stop
    (it must use acks="all"); otherwise the runtime owns one.
    """

    def __init__(
        self,
        settings: Settings,
        connection: KafkaConnection,
        *,
        producer: AIOKafkaProducer | None = None,
        clock: DayClock | None = None,
    ) -> None:
        quota = settings.quota
        self.settings = settings
        self.book = LimitBook(limit_defaults(quota))
        self._owns_producer = producer is None
        self.producer = producer or make_state_producer(connection)
        self.follower = LimitFollower(
            self.book,
            connection=connection,
            topic=quota.control_topic,
            fetch_max_wait_ms=settings.kafka.fetch_max_wait_ms,
        )
        self.store = QuotaStore(
            book=self.book,
            settings=quota,
            producer=self.producer,
            connection=connection,
            fetch_max_wait_ms=settings.kafka.fetch_max_wait_ms,
            expected_partitions=settings.topics.request_partitions,
            clock=clock or offset_clock(quota.clock_offset_s),
        )
        self.publisher = LimitCommandPublisher(self.producer, quota.control_topic)

    async def start(self) -> None:
        """Start the producer (if owned) and catch up with the control topic."""
        if self._owns_producer:
            await self.producer.start()
        await self.follower.start()

    async def stop(self) -> None:
        """Stop following limit commands and close what the runtime owns."""
        await self.follower.stop()
        if self._owns_producer:
            await self.producer.stop()

    def admin_routes(self) -> list[tuple[str, AdminHandler]]:
        """The admin HTTP API's routes for `AsgiFastStream(asgi_routes=...)`."""
        return admin_routes(self.store, self.publisher, self.settings, self.follower)

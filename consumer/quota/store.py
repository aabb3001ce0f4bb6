"""The partition-local quota state store, backed by the compacted, co-partitioned state topic."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import ValidationError

from consumer.bus.connection import KafkaConnection
from consumer.bus.topic_reader import (
    TopicUnavailable,
    read_to_end,
    standalone_consumer,
    topic_partitions,
)
from consumer.errors import InfrastructureError
from consumer.quota.days import day_of, resets_at
from consumer.quota.ledger import ChargeKey, QuotaLedger, Reservation
from consumer.quota.limit_book import DailyCap, LimitBook, Usage
from consumer.quota.partitions import partition_for_tenant
from consumer.settings.quota import QuotaSettings
from schemas.quota import TOTAL, QuotaCharge
from schemas.requests import OPERATIONS

log = logging.getLogger(__name__)

DayClock = Callable[[], datetime]
"""The quota clock: an aware `datetime` now (the day is computed from it; tests shift it)."""


def utc_now() -> datetime:
    """The real clock (tests inject their own)."""
    return datetime.now(UTC)


def offset_clock(offset_s: float) -> DayClock:
    """The real clock shifted by `offset_s` seconds (`QuotaSettings.clock_offset_s`)."""
    if not offset_s:
        return utc_now
    shift = timedelta(seconds=offset_s)
    return lambda: datetime.now(UTC) + shift


class PartitionNotRestored(InfrastructureError):
    """A reservation named a partition this store has not restored (or has forgotten)."""

    retryable = True


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """A tenant's usage of one operation (or `TOTAL`) today, with its limits."""

    tenant_id: str
    operation: str
    day: date
    used: Usage
    cap: DailyCap
    resets_at: datetime


def make_state_producer(connection: KafkaConnection) -> AIOKafkaProducer:
    """A producer fit for the state and control topics: acks from every in-sync replica.

    Not idempotent, because Tansu's memory storage refuses InitProducerId. That is safe
    here: aiokafka keeps one request in flight per broker, so a retry cannot reorder a
    key's records, and a duplicated record is harmless because each one is the whole
    state of its key.
    """
    return AIOKafkaProducer(**connection.client_kwargs(), acks="all", linger_ms=0)


class QuotaStore:
    """Counters of the tenants on the partitions this instance owns.

    Call `restore` when partitions are assigned (before reserving on them), `persist`
    before committing an offset (and before running a request, see README), `forget`
    when partitions are revoked (after persisting). `reserve` and `settle` do no I/O.
    The producer is passed in, started and stopped by the caller, and must use
    acks="all" (see `make_state_producer`).
    """

    def __init__(
        self,
        *,
        book: LimitBook,
        settings: QuotaSettings,
        producer: AIOKafkaProducer,
        connection: KafkaConnection,
        fetch_max_wait_ms: int = 500,
        expected_partitions: int | None = None,
        clock: DayClock = utc_now,
    ) -> None:
        self.book = book
        self.settings = settings
        self.tz = settings.zone()
        self.topic = settings.state_topic
        self.clock = clock
        self._producer = producer
        self._connection = connection
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._expected_partitions = expected_partitions
        self._ledgers: dict[int, QuotaLedger] = {}
        self._in_flight: dict[int, set[asyncio.Future[Any]]] = {}
        self._next_flush: dict[int, asyncio.Future[None]] = {}

    @property
    def owned_partitions(self) -> frozenset[int]:
        """Partitions restored and not forgotten."""
        return frozenset(self._ledgers)

    def ledger(self, partition: int) -> QuotaLedger:
        """The counters of one owned partition."""
        found = self._ledgers.get(partition)
        if found is None:
            raise PartitionNotRestored(f"quota state of partition {partition} is not restored")
        return found

    # ── ownership ──

    async def restore(self, partitions: set[int]) -> None:
        """Rebuild the counters of `partitions` from the state topic's same partitions."""
        if not partitions:
            return
        started = asyncio.get_running_loop().time()
        now = self.clock()
        fresh = {p: QuotaLedger(p, self.book, self.tz) for p in partitions}
        count = 0
        consumer = self._consumer()
        await consumer.start()
        try:
            existing = await topic_partitions(consumer, self.topic)
            self._check_shape(existing, partitions)
            async for record in read_to_end(
                consumer, self.topic, partitions, timeout_s=self.settings.restore_timeout_s
            ):
                if record.value is None:
                    continue
                try:
                    charge = QuotaCharge.model_validate_json(record.value)
                except ValidationError:
                    log.warning(
                        "quota_state_record_skipped",
                        extra={"partition": record.partition, "offset": record.offset},
                    )
                    continue
                fresh[record.partition].load(charge, now)
                count += 1
        finally:
            await consumer.stop()
        self._ledgers.update(fresh)
        log.info(
            "quota_restored",
            extra={
                "partitions": sorted(partitions),
                "records": count,
                "elapsed_ms": round((asyncio.get_running_loop().time() - started) * 1000, 1),
            },
        )

    def forget(self, partitions: set[int]) -> None:
        """Drop the counters of revoked partitions (persist them first)."""
        for partition in partitions:
            ledger = self._ledgers.pop(partition, None)
            if ledger is not None and ledger.dirty_count:
                log.warning(
                    "quota_forgot_unpersisted",
                    extra={"partition": partition, "charges": ledger.dirty_count},
                )

    # ── the request path ──

    def reserve(
        self,
        partition: int,
        tenant_id: str,
        operation: str,
        request_id: str,
        input_tokens: int,
        max_tokens: int,
        now: datetime | None = None,
        *,
        origin: str | None = None,
        fingerprint: str | None = None,
        body_digest: str | None = None,
    ) -> Reservation:
        """Charge one request and `input_tokens + max_tokens`, or raise QuotaExceeded.

        The same record charged before (a redelivery, same `origin`) comes back with
        `duplicate=True` and is not charged again; another record reusing its request_id
        is refused (see `QuotaLedger.reserve`). No I/O: call `persist(partition)`.
        """
        when = now or self.clock()
        if not self.settings.enabled:
            day = day_of(when, self.tz)
            return Reservation(
                partition=partition,
                tenant_id=tenant_id,
                operation=operation,
                request_id=request_id,
                day=day,
                tokens=input_tokens + max_tokens,
                resets_at=resets_at(day, self.tz),
            )
        return self.ledger(partition).reserve(
            tenant_id,
            operation,
            request_id,
            input_tokens,
            max_tokens,
            when,
            origin=origin,
            fingerprint=fingerprint,
            body_digest=body_digest,
        )

    def store_answer(self, reservation: Reservation, answer: str) -> bool:
        """Keep the final reply of a request that ended for good beside its charge (persisted
        with it), so a retry is answered with it; False when not kept (larger than
        `stored_answer_max_bytes`, or the request may still be retried as new)."""
        ledger = self._ledgers.get(reservation.partition)
        if ledger is None or len(answer.encode()) > self.settings.stored_answer_max_bytes:
            return False
        return ledger.store_answer(reservation, answer)

    def settle(
        self,
        reservation: Reservation,
        input_tokens: int,
        output_tokens: int,
        outcome: str = "ok",
        *,
        ran: bool = True,
    ) -> None:
        """Lower a reservation to the real token count (never raises it; never below zero)
        and note how the request ended ("ok" or its error code); release it when the model
        never ran it (`ran` False)."""
        ledger = self._ledgers.get(reservation.partition)
        if ledger is not None:
            ledger.settle(reservation, input_tokens, output_tokens, outcome, ran=ran)

    async def persist(self, partition: int) -> None:
        """Write the partition's changed charges and return once the broker acknowledged them
        and every earlier write of this partition.

        Callers on one partition share a flush (group commit): the first schedules it for
        the next loop tick, the ones arriving before it starts join it, so concurrent
        requests cost one flush instead of one each.
        """
        if partition not in self._ledgers:
            return
        flush = self._next_flush.get(partition)
        if flush is None:
            flush = asyncio.ensure_future(self._flush_next_tick(partition))
            self._next_flush[partition] = flush
        await asyncio.shield(flush)

    async def _flush_next_tick(self, partition: int) -> None:
        await asyncio.sleep(0)  # let requests that are ready now dirty their charges first
        self._next_flush.pop(partition, None)
        ledger = self._ledgers.get(partition)
        if ledger is None:
            return
        batch = ledger.take_dirty()
        in_flight = self._in_flight.setdefault(partition, set())
        mine: list[tuple[ChargeKey, asyncio.Future[Any]]] = []
        try:
            for charge, key, value in batch:
                future = await self._producer.send(
                    self.topic, value=value, key=key, partition=partition
                )
                mine.append((charge, future))
                in_flight.add(future)
        except BaseException:
            sent = {charge for charge, _ in mine}
            ledger.mark_dirty(charge for charge, _, _ in batch if charge not in sent)
            raise
        waiting = list(in_flight)
        results = await asyncio.gather(*waiting, return_exceptions=True)
        in_flight.difference_update(waiting)
        failed = {id(f) for f, r in zip(waiting, results, strict=True) if isinstance(r, Exception)}
        if failed:
            ledger.mark_dirty(charge for charge, f in mine if id(f) in failed)
            first = next(r for r in results if isinstance(r, Exception))
            log.error(
                "quota_persist_failed", extra={"partition": partition, "error": repr(first)[:300]}
            )
            raise first

    # ── views ──

    async def usage(
        self, tenant_id: str | None = None, now: datetime | None = None
    ) -> list[TenantUsage]:
        """Today's usage per tenant and operation: owned partitions from memory, the others
        read from the state topic (so any instance can answer for every tenant)."""
        when = now or self.clock()
        ledgers = dict(self._ledgers)
        consumer = self._consumer()
        await consumer.start()
        try:
            existing = await topic_partitions(consumer, self.topic)
            wanted = existing - set(ledgers)
            if tenant_id is not None:
                home = partition_for_tenant(tenant_id, len(existing))
                wanted &= {home}
            others = {p: QuotaLedger(p, self.book, self.tz) for p in wanted}
            async for record in read_to_end(
                consumer, self.topic, wanted, timeout_s=self.settings.restore_timeout_s
            ):
                if record.value is not None:
                    try:
                        others[record.partition].load(
                            QuotaCharge.model_validate_json(record.value), when
                        )
                    except ValidationError:
                        continue
        finally:
            await consumer.stop()
        ledgers.update(others)
        today = day_of(when, self.tz)
        tenants = {t for ledger in ledgers.values() for t in ledger.tenants(today)}
        if tenant_id is not None:
            tenants = {tenant_id}
        rows: list[TenantUsage] = []
        for tenant in sorted(tenants):
            for scope in (*OPERATIONS, TOTAL):
                used = Usage()
                for ledger in ledgers.values():
                    part = ledger.usage(tenant, scope, when)
                    used.requests += part.requests
                    used.tokens += part.tokens
                rows.append(
                    TenantUsage(
                        tenant_id=tenant,
                        operation=scope,
                        day=today,
                        used=used,
                        cap=self.book.resolve(tenant, scope),
                        resets_at=resets_at(today, self.tz),
                    )
                )
        return rows

    # ── internals ──

    def _consumer(self) -> AIOKafkaConsumer:
        return standalone_consumer(self._connection, fetch_max_wait_ms=self._fetch_max_wait_ms)

    def _check_shape(self, existing: set[int], wanted: set[int]) -> None:
        if self._expected_partitions is not None and len(existing) != self._expected_partitions:
            raise TopicUnavailable(
                f"state topic {self.topic} has {len(existing)} partitions, the request topic "
                f"{self._expected_partitions}; they must be co-partitioned"
            )
        missing = wanted - existing
        if missing:
            raise TopicUnavailable(
                f"state topic {self.topic} has no partitions {sorted(missing)}; it must have "
                "as many partitions as the request topic"
            )

"""Limit commands on the compacted control topic: publishing them and following them into a book."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import date

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import TypeAdapter, ValidationError

from consumer.bus.connection import KafkaConnection
from consumer.bus.topic_reader import read_to_end, standalone_consumer, topic_partitions
from consumer.quota.limit_book import LimitBook, LimitDefaults, Override, OverrideValue
from schemas.quota import (
    CONTROL_LIMITS_KEY,
    LIMIT_COMMAND_KINDS,
    LimitCommand,
    ResetUsage,
    SetLimits,
    limits_key,
    parse_key,
    reset_key,
)

log = logging.getLogger(__name__)

_commands: TypeAdapter[SetLimits | ResetUsage] = TypeAdapter(LimitCommand)


def apply_control_record(book: LimitBook, key: bytes | None, value: bytes | None) -> bool:
    """Apply one control-topic record to `book`; False when it is not a quota command.

    The control topic is shared, so records of other kinds are skipped, and a malformed
    quota command is logged and skipped rather than stopping every instance.
    """
    parts = parse_key(key)
    if parts is None:
        return False
    if value is None:
        if parts[0] == CONTROL_LIMITS_KEY and len(parts) == 3:
            book.delete_override(parts[1], parts[2])
            return True
        return False
    try:
        command = _commands.validate_json(value)
    except ValidationError as exc:
        if any(f'"{kind}"' in value.decode(errors="replace") for kind in LIMIT_COMMAND_KINDS):
            log.warning(
                "quota_control_record_invalid",
                extra={"key": (key or b"").decode(errors="replace"), "errors": exc.error_count()},
            )
        return False
    if isinstance(command, SetLimits):
        book.set_override(
            command.tenant_id,
            command.operation,
            Override(requests=command.daily_requests, tokens=command.daily_tokens),
        )
    else:
        book.set_reset(command.tenant_id, command.day, command.reset_id)
    return True


class LimitCommandPublisher:
    """Writes limit commands to the control topic and waits for the broker's acknowledgement.

    The producer is passed in and owned by the caller (acks="all").
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self.topic = topic

    async def set_limits(
        self,
        tenant_id: str,
        operation: str,
        *,
        daily_requests: OverrideValue,
        daily_tokens: OverrideValue,
        issued_by: str | None = None,
    ) -> tuple[int, int]:
        """Replace the override of (tenant, operation); both None deletes it.

        Returns (partition, offset) of the command, for `LimitFollower.wait_applied`.
        """
        key = limits_key(tenant_id, operation)
        if daily_requests is None and daily_tokens is None:
            return await self._send(key, None)
        command = SetLimits(
            tenant_id=tenant_id,
            operation=operation,  # validated by SetLimits
            daily_requests=daily_requests,
            daily_tokens=daily_tokens,
            issued_by=issued_by,
        )
        return await self._send(key, command.model_dump_json().encode())

    async def reset_usage(
        self, tenant_id: str, day: date, *, issued_by: str | None = None
    ) -> tuple[int, int]:
        """Restart the tenant's counters of `day` from zero."""
        command = ResetUsage(
            tenant_id=tenant_id, day=day, reset_id=uuid.uuid4().hex, issued_by=issued_by
        )
        return await self._send(reset_key(tenant_id, day), command.model_dump_json().encode())

    async def _send(self, key: bytes, value: bytes | None) -> tuple[int, int]:
        metadata = await self._producer.send_and_wait(self.topic, value=value, key=key)
        return metadata.partition, metadata.offset


class LimitFollower:
    """Reads the whole control topic on start, then keeps applying new commands to a LimitBook.

    Uses manual assignment of every partition (no consumer group), so every instance
    sees every command, and starting takes milliseconds rather than a group join.
    """

    def __init__(
        self,
        book: LimitBook,
        *,
        connection: KafkaConnection,
        topic: str,
        fetch_max_wait_ms: int = 500,
        catch_up_timeout_s: float = 60.0,
    ) -> None:
        self.book = book
        self.topic = topic
        self._connection = connection
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._catch_up_timeout_s = catch_up_timeout_s
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._positions: dict[int, int] = {}
        self._progress = asyncio.Condition()

    async def start(self) -> None:
        """Apply every command on the topic so far, then follow it in the background."""
        consumer = standalone_consumer(self._connection, fetch_max_wait_ms=self._fetch_max_wait_ms)
        await consumer.start()
        try:
            partitions = await topic_partitions(consumer, self.topic)
            count = 0
            async for record in read_to_end(
                consumer, self.topic, partitions, timeout_s=self._catch_up_timeout_s
            ):
                count += apply_control_record(self.book, record.key, record.value)
            for p in partitions:
                self._positions[p] = await consumer.position(TopicPartition(self.topic, p))
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._follow(), name="quota-limit-follower")
        self._task.add_done_callback(self._report_stop)
        log.info("quota_control_caught_up", extra={"topic": self.topic, "commands": count})

    async def stop(self) -> None:
        """Stop following and close the consumer."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def wait_applied(self, partition: int, offset: int, timeout_s: float = 10.0) -> None:
        """Return once the command at (partition, offset) has been applied to the book."""
        async with asyncio.timeout(timeout_s), self._progress:
            await self._progress.wait_for(lambda: self._positions.get(partition, 0) > offset)

    def _report_stop(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Limits would silently stop changing on this instance: make it loud.
            log.error("quota_control_follower_died", extra={"error": repr(task.exception())[:300]})

    async def _follow(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000)
            except KafkaError as exc:
                # Transient broker trouble must not stop limits from applying; retry.
                log.warning("quota_control_fetch_failed", extra={"error": repr(exc)[:300]})
                await asyncio.sleep(1.0)
                continue
            for tp, records in batches.items():
                for record in records:
                    if apply_control_record(self.book, record.key, record.value):
                        log.info(
                            "quota_limit_command_applied",
                            extra={"key": (record.key or b"").decode(errors="replace")},
                        )
                    self._positions[tp.partition] = record.offset + 1
            if batches:
                async with self._progress:
                    self._progress.notify_all()


async def load_limit_book(
    defaults: LimitDefaults,
    *,
    connection: KafkaConnection,
    topic: str,
    fetch_max_wait_ms: int = 500,
    timeout_s: float = 60.0,
) -> LimitBook:
    """The limit book as of now, read once from the control topic (for the CLI)."""
    book = LimitBook(defaults)
    consumer = standalone_consumer(connection, fetch_max_wait_ms=fetch_max_wait_ms)
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic)
        async for record in read_to_end(consumer, topic, partitions, timeout_s=timeout_s):
            apply_control_record(book, record.key, record.value)
    finally:
        await consumer.stop()
    return book

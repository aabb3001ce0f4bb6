"""Record batches the consumer cannot read: set their partition aside, count, say what to do.

A batch whose compression codec is not installed, or whose bytes fail their CRC, cannot be
turned into records, so there is nothing to dead-letter: aiokafka raises from `getone()`
each time it fetches the batch again, and FastStream's consume loop, left alone, logs and
sleeps (15 s for a codec, 5 s otherwise) before fetching again — holding up every partition
of the instance, while `/health` says `healthy`. `UnreadableBatches.guard` wraps the
subscriber's fetch: it pauses the one partition (the batch stays where it is: nothing is
skipped or committed past it), counts it in `opstream.unreadable_batches`, logs one
`unreadable_batch` event with what to install or do, and keeps fetching the others.
`current()` feeds `/health`, which stays `degraded` while any partition is set aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from aiokafka import TopicPartition
from aiokafka.errors import CorruptRecordException, KafkaError, UnsupportedCodecError

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer

    from consumer.observability.metrics import Metrics

log = logging.getLogger(__name__)

# What aiokafka raises when a fetched batch cannot be decoded into records.
UNREADABLE_ERRORS: tuple[type[KafkaError], ...] = (UnsupportedCodecError, CorruptRecordException)
# The codecs Kafka defines besides gzip (which needs nothing): aiokafka reads them with cramjam.
CODEC_EXTRAS = ("lz4", "snappy", "zstd")
# How long a batch whose partition could not be named keeps `/health` degraded after it was
# last seen (FastStream retries such a fetch every 15 s, so a persisting one stays listed).
UNNAMED_VISIBLE_S = 60.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class UnreadableBatch:
    """A batch the consumer could not read: where it is, why, and what to do about it."""

    topic: str | None  # None: aiokafka did not say which partition (see `failing_partition`)
    partition: int | None
    offset: int | None  # the first offset not read: the batch holds it
    error: str  # the exception's class name
    detail: str  # aiokafka's message (it names a codec or a CRC, never record content)
    hint: str
    seen_at: float

    @property
    def where(self) -> str:
        return "unknown partition" if self.topic is None else f"{self.topic}-{self.partition}"

    def as_dict(self) -> dict[str, Any]:
        """The `/health` entry."""
        return {
            "partition": self.where,
            "offset": self.offset,
            "error": self.error,
            "detail": self.detail,
            "hint": self.hint,
        }


def hint_for(error: BaseException) -> str:
    """What an operator installs or does about `error` (one sentence for logs and /health)."""
    if isinstance(error, UnsupportedCodecError):
        found = re.search(r"for (\w+) compression", str(error))
        if found and found.group(1) in CODEC_EXTRAS:
            codec = found.group(1)
            return (
                f"install aiokafka's {codec} codec (pip install 'aiokafka[{codec}]', which "
                "brings cramjam; opstream's own dependencies include it, so the image or "
                "virtualenv was built without them) and restart: the batch is read then"
            )
        return (
            "the producer used a compression codec Kafka does not define: fix the producer, "
            "then move the group past the batch (kafka-consumer-groups --reset-offsets, with "
            "the consumers stopped); its requests are lost"
        )
    return (
        "the batch is corrupt (its CRC or framing does not check out): inspect the log "
        "segment on the broker, then move the group past the batch (kafka-consumer-groups "
        "--reset-offsets, with the consumers stopped); its requests are lost"
    )


def failing_partition(error: BaseException) -> TopicPartition | None:
    """The partition aiokafka's fetcher was reading when it raised `error`, or None.

    The exception does not name it (UnsupportedCodecError's message names only the codec),
    but the fetcher raises it while it iterates its fetched partitions with a local `tp`
    (aiokafka 0.14 `Fetcher.next_record`, `.fetched_records`,
    `PartitionRecords._unpack_records`): the innermost such frame names the partition.
    """
    found: TopicPartition | None = None
    trace = error.__traceback__
    while trace is not None:
        candidate = trace.tb_frame.f_locals.get("tp")
        if isinstance(candidate, TopicPartition):
            found = candidate
        trace = trace.tb_next
    return found


class UnreadableBatches:
    """The partitions this instance set aside because a batch in them cannot be read."""

    def __init__(
        self, metrics: Metrics | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._batches: dict[TopicPartition | None, UnreadableBatch] = {}
        self._consumer: AIOKafkaConsumer | None = None

    def guard(
        self, get_msg: Callable[[AIOKafkaConsumer], Awaitable[T]]
    ) -> Callable[[AIOKafkaConsumer], Awaitable[T]]:
        """Wrap the subscriber's `get_msg(consumer)` (FastStream calls it for every record)."""

        async def guarded(consumer: AIOKafkaConsumer) -> T:
            self._consumer = consumer
            while True:
                try:
                    return await get_msg(consumer)
                except UNREADABLE_ERRORS as error:
                    # (Not named `tp`: `failing_partition` reads that name off the frames.)
                    where = failing_partition(error)
                    if where in consumer.assignment() and where not in consumer.paused():
                        consumer.pause(where)
                        self.record(error, where, await _position(consumer, where), paused=True)
                        continue
                    # Unnamed (or no longer ours): FastStream's loop backs off and retries.
                    self.record(error, where, None, paused=False)
                    raise

        return guarded

    def record(
        self,
        error: BaseException,
        tp: TopicPartition | None,
        offset: int | None,
        *,
        paused: bool,
    ) -> UnreadableBatch:
        """Count and log one unreadable batch (`tp` None: aiokafka did not say where)."""
        batch = UnreadableBatch(
            topic=tp.topic if tp is not None else None,
            partition=tp.partition if tp is not None else None,
            offset=offset,
            error=type(error).__name__,
            detail=str(error),
            hint=hint_for(error),
            seen_at=self._clock(),
        )
        self._batches[tp] = batch
        if self._metrics is not None:
            self._metrics.count_unreadable_batch(batch.topic, batch.partition, batch.error)
        log.error(
            "unreadable_batch",
            extra={
                "partition": batch.where,
                "offset": offset,
                "error": batch.error,
                "detail": batch.detail,
                "hint": batch.hint,
                "action": (
                    "partition paused on this instance until a restart or rebalance; "
                    "the others are served"
                    if paused
                    else "fetch retried"
                ),
            },
        )
        return batch

    def current(self) -> list[UnreadableBatch]:
        """The batches that still hold a partition up (what `/health` lists).

        A named partition counts while it stays paused on the consumer that set it aside (a
        rebalance hands out fresh, unpaused assignments: the batch is fetched again, and
        reported again if it still cannot be read); an unnamed one while seen recently.
        """
        consumer = self._consumer
        paused = consumer.paused() if consumer is not None else set()
        now = self._clock()
        return [
            batch
            for tp, batch in self._batches.items()
            if (tp is not None and tp in paused)
            or (tp is None and now - batch.seen_at < UNNAMED_VISIBLE_S)
        ]

    def health_entries(self) -> list[dict[str, Any]]:
        """`current()` as `/health` shows it."""
        return [batch.as_dict() for batch in self.current()]


async def _position(consumer: AIOKafkaConsumer, tp: TopicPartition | None) -> int | None:
    """The partition's fetch position (the failing batch holds it), or None if not known now."""
    if tp is None:
        return None
    with contextlib.suppress(KafkaError, asyncio.TimeoutError):
        return await asyncio.wait_for(consumer.position(tp), 1.0)
    return None

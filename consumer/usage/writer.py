"""UsageWriter: buffers usage rows and makes them durable in batches, off the event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from consumer.errors import InfrastructureError
from consumer.settings.usage import UsageSettings
from consumer.usage.catalog import ensure_catalog
from consumer.usage.compaction import PeriodicCompaction
from consumer.usage.layout import hour_of_epoch
from consumer.usage.segments import RowValues, SegmentWriter, epoch_hour, row_values
from schemas.usage import UsageRow

log = logging.getLogger(__name__)

_ONE_HOUR = timedelta(hours=1)


class UsageWriteFailed(InfrastructureError):
    """A batch of usage rows could not be made durable; their offsets must not be committed."""


class UsageWriterClosed(InfrastructureError):
    """A row was appended after `close()` began."""


DoneCallback = Callable[[BaseException | None], None]


class UsageReceipt:
    """One batch's promise of durability, shared by every row appended to it.

    `await receipt.wait()` returns once the batch is on disk (or raises
    `UsageWriteFailed`); `add_done_callback(fn)` calls `fn(None)` or `fn(error)` on the
    event loop then, so an offset tracker can mark offsets durable without a task per row.
    """

    __slots__ = ("_callbacks", "_done", "by_hour", "error", "first_at", "size")

    def __init__(self) -> None:
        self.by_hour: dict[int, list[RowValues]] = {}
        # An Event, not a shared Future: cancelling one waiter must not cancel the batch
        # for the others, and shielding a future per append costs twice as much.
        self._done = asyncio.Event()
        self._callbacks: list[DoneCallback] = []
        self.error: BaseException | None = None
        self.first_at = time.monotonic()
        self.size = 0

    def done(self) -> bool:
        """True once the batch was flushed or failed."""
        return self._done.is_set()

    async def wait(self) -> None:
        """Return once the batch is durable; raise `UsageWriteFailed` if its flush failed."""
        await self._done.wait()
        if self.error is not None:
            raise UsageWriteFailed(f"usage flush of {self.size} rows failed: {self.error}")

    def add_done_callback(self, callback: DoneCallback) -> None:
        """Call `callback(error or None)` when the batch is done (at once if it already is)."""
        if self._done.is_set():
            callback(self.error)
        else:
            self._callbacks.append(callback)

    def _resolve(self, error: BaseException | None) -> None:
        self.error = error
        self._done.set()
        for callback in self._callbacks:
            try:
                callback(error)
            except Exception:
                log.exception("usage_receipt_callback_failed")
        self._callbacks.clear()


class UsageWriter:
    """Appends usage rows; `append` returns once the row is in a fsynced, renamed segment.

    Concurrent appenders share one batch. A batch is flushed when it holds
    `flush_rows` rows, when its oldest row is `flush_age_s` old, on `flush()` and on
    `close()`. One flush runs at a time, in a worker thread; rows appended meanwhile
    form the next batch, so batches grow by themselves when the disk is slow.
    """

    def __init__(self, settings: UsageSettings, instance_id: str) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.root = Path(settings.directory).absolute()
        self._segments = SegmentWriter(self.root, instance_id, settings.compression)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-flush")
        self._pending: UsageReceipt | None = None
        self._in_flight: UsageReceipt | None = None
        self._wake = asyncio.Event()
        self._flush_now = False
        self._closing = False
        self._flusher: asyncio.Task[None] | None = None
        self._compaction: PeriodicCompaction | None = None
        # The UTC hour of the last row, cached: almost every row lands in the same one.
        self._hour_key = 0
        self._hour_lo = self._hour_hi = hour_of_epoch(0)
        self.rows_written = 0
        self.segments_written = 0

    async def start(self) -> None:
        """Create the catalog (idempotent), start the flusher and, if configured, compaction."""
        if self._flusher is not None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, ensure_catalog, self.settings)
        self._flusher = asyncio.create_task(self._flush_loop(), name="usage-flusher")
        if self.settings.compact_interval_s > 0:
            self._compaction = PeriodicCompaction(self.settings)
            await self._compaction.start()
        log.info(
            "usage_writer_started",
            extra={
                "directory": str(self.root),
                "instance_id": self.instance_id,
                "flush_rows": self.settings.flush_rows,
                "flush_age_s": self.settings.flush_age_s,
            },
        )

    async def append(self, row: UsageRow) -> None:
        """Buffer `row` and return once it is durable on disk (raises `UsageWriteFailed`)."""
        await self.append_nowait(row).wait()

    def append_nowait(self, row: UsageRow) -> UsageReceipt:
        """Buffer `row` and return the receipt of the batch it will be flushed with."""
        if self._closing or self._flusher is None:
            raise UsageWriterClosed("usage writer is not running")
        batch = self._pending
        if batch is None:
            batch = self._pending = UsageReceipt()
            self._wake.set()  # the flusher starts the age clock of this batch
        finished_at = row.finished_at
        if self._hour_lo <= finished_at < self._hour_hi:
            hour_key = self._hour_key
        else:
            hour_key = self._hour_key = epoch_hour(row)
            self._hour_lo = hour_of_epoch(hour_key)
            self._hour_hi = self._hour_lo + _ONE_HOUR
        rows = batch.by_hour.get(hour_key)
        if rows is None:
            rows = batch.by_hour[hour_key] = []
        rows.append(row_values(row))
        batch.size += 1
        if batch.size >= self.settings.flush_rows:
            self._wake.set()
        return batch

    async def flush(self) -> None:
        """Make every row appended so far durable (e.g. before offsets are committed on revoke)."""
        batches = [b for b in (self._in_flight, self._pending) if b is not None]
        if self._pending is not None:
            self._flush_now = True
            self._wake.set()
        for batch in batches:
            await batch.wait()

    async def close(self) -> None:
        """Flush what is buffered and stop; later appends raise `UsageWriterClosed`."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._compaction is not None:
            await self._compaction.close()
        if self._flusher is not None:
            await self._flusher
        self._executor.shutdown(wait=True)
        self._segments.close()
        log.info(
            "usage_writer_closed",
            extra={"rows": self.rows_written, "segments": self.segments_written},
        )

    def _due(self, batch: UsageReceipt) -> float:
        """Seconds until `batch` must be flushed (0 = now)."""
        if self._closing or self._flush_now or batch.size >= self.settings.flush_rows:
            return 0.0
        return max(0.0, batch.first_at + self.settings.flush_age_s - time.monotonic())

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._pending
            if batch is None:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = self._due(batch)
            if delay > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                except TimeoutError:
                    pass
                continue
            self._pending = None
            self._flush_now = False
            self._in_flight = batch
            started = time.perf_counter()
            # Stays set if the flush is interrupted (cancelled): its rows are not durable.
            error: BaseException | None = UsageWriterClosed("usage flush was interrupted")
            try:
                paths = await loop.run_in_executor(
                    self._executor, self._segments.write, batch.by_hour
                )
            except Exception as exc:
                log.error(
                    "usage_flush_failed", extra={"rows": batch.size, "error": repr(exc)[:300]}
                )
                error = exc
            else:
                error = None
                self.rows_written += batch.size
                self.segments_written += len(paths)
                log.debug(
                    "usage_flushed",
                    extra={
                        "rows": batch.size,
                        "segments": len(paths),
                        "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
                    },
                )
            finally:
                self._in_flight = None
                batch._resolve(error)

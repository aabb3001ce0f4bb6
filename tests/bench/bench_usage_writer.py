"""Benchmark of UsageWriter: sustained rows/s and the event-loop stall a flush causes.

Run: .venv/bin/python tests/bench/bench_usage_writer.py [--rows 500000] [--dir /tmp/x]
Not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _common import bench_parser  # first: puts the repository on sys.path

from consumer.usage import UsageSettings, UsageWriter
from consumer.usage.segments import SegmentWriter, row_values, rows_to_arrow
from schemas.usage import UsageRow

OPERATIONS = ("summarize", "translate", "classify", "chat")


def make_rows(count: int) -> list[UsageRow]:
    """Valid, varied rows (ok and error outcomes), all in the current hour."""
    now = datetime.now(UTC)
    rows = []
    for i in range(count):
        ok = i % 10 != 0
        rows.append(
            UsageRow(
                tenant_id=f"tenant-{i % 37}",
                operation=OPERATIONS[i % 4],
                model="qwen2.5-7b-instruct-exl2-4.0bpw" if ok else None,
                status="ok" if ok else "error",
                error_code=None if ok else "quota_exceeded",
                input_chars=200 + i % 5000,
                input_tokens=60 + i % 1200 if ok else None,
                output_tokens=i % 512 if ok else None,
                queue_ms=float(i % 50),
                execution_ms=float(100 + i % 900) if ok else None,
                total_ms=float(150 + i % 1000),
                request_id=f"req-{i:012d}",
                correlation_id=f"corr-{i:012d}",
                kafka_topic="ops.requests.v1",
                kafka_partition=i % 12,
                kafka_offset=i,
                instance_id="bench-1",
                received_at=now - timedelta(milliseconds=150 + i % 1000),
                finished_at=now,
            )
        )
    return rows


class Ticker:
    """Wakes every `interval_s`; records how late each wake-up was (the loop's stall)."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.recording = False
        self.lateness_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            late = (loop.time() - expected) * 1000
            if self.recording:
                self.lateness_ms.append(max(0.0, late))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    def summary(self) -> str:
        if not self.lateness_ms:
            return "no samples"
        values = sorted(self.lateness_ms)
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        return (
            f"max {values[-1]:.1f} ms, p99 {p99:.1f} ms, "
            f"median {statistics.median(values):.2f} ms over {len(values)} ticks"
        )


async def bench_awaited(rows: list[UsageRow], settings: UsageSettings, producers: int) -> None:
    """`await append(row)` from many long-lived tasks, as in-flight request handlers would."""
    writer = UsageWriter(settings, "bench-awaited")
    await writer.start()
    ticker = Ticker()
    ticker.start()
    ticker.recording = True
    chunk = len(rows) // producers

    async def produce(part: list[UsageRow]) -> None:
        for row in part:
            await writer.append(row)

    started = time.perf_counter()
    await asyncio.gather(*(produce(rows[i * chunk : (i + 1) * chunk]) for i in range(producers)))
    elapsed = time.perf_counter() - started
    ticker.recording = False
    await ticker.stop()
    await writer.close()
    total = chunk * producers
    print(
        f"append (awaited, {producers} concurrent producers): {total / elapsed:,.0f} rows/s "
        f"({total:,} rows, {writer.segments_written} segments, {elapsed:.2f} s)"
    )
    print(f"  event-loop stall while sustained: {ticker.summary()}")


async def bench_receipts(rows: list[UsageRow], settings: UsageSettings) -> None:
    """`append_nowait(row)` + one receipt per batch, as an offset tracker would use it."""
    writer = UsageWriter(settings, "bench-receipts")
    await writer.start()
    ticker = Ticker()
    ticker.start()
    ticker.recording = True
    started = time.perf_counter()
    receipt = None
    for i, row in enumerate(rows):
        receipt = writer.append_nowait(row)
        if i % 1000 == 999:
            await asyncio.sleep(0)  # let the flusher and the ticker run, as a consumer would
    assert receipt is not None
    await receipt.wait()
    elapsed = time.perf_counter() - started
    ticker.recording = False
    await ticker.stop()
    await writer.close()
    print(
        f"append_nowait + receipt: {len(rows) / elapsed:,.0f} rows/s "
        f"({len(rows):,} rows, {writer.segments_written} segments, {elapsed:.2f} s)"
    )
    print(f"  event-loop stall while sustained: {ticker.summary()}")


async def bench_flush_stall(rows: list[UsageRow], settings: UsageSettings, batches: int) -> None:
    """Only the flush runs while the ticker measures: the stall a flush alone causes."""
    writer = UsageWriter(settings, "bench-stall")
    await writer.start()
    ticker = Ticker()
    ticker.start()
    size = settings.flush_rows
    flush_ms: list[float] = []
    for b in range(batches):
        part = rows[(b * size) % len(rows) :][:size]
        receipt = None
        for row in part:
            receipt = writer.append_nowait(row)
        assert receipt is not None
        ticker.recording = True
        started = time.perf_counter()
        await receipt.wait()
        flush_ms.append((time.perf_counter() - started) * 1000)
        ticker.recording = False
    await ticker.stop()
    await writer.close()
    print(
        f"flush of {size:,} rows: median {statistics.median(flush_ms):.1f} ms, "
        f"max {max(flush_ms):.1f} ms ({batches} flushes)"
    )
    print(f"  event-loop stall during flushes: {ticker.summary()}")


def bench_segment_path(rows: list[UsageRow], root: Path, size: int) -> None:
    """The worker-thread path alone: tuples → Arrow → DuckDB COPY → fsync → rename."""
    values = [row_values(r) for r in rows[:size]]
    writer = SegmentWriter(root, "bench-segment")
    arrow_ms, write_ms = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        rows_to_arrow(values)
        t1 = time.perf_counter()
        writer.write({0: values})
        t2 = time.perf_counter()
        arrow_ms.append((t1 - t0) * 1000)
        write_ms.append((t2 - t1) * 1000)
    writer.close()
    arrow = statistics.median(arrow_ms)
    total = statistics.median(write_ms)
    print(
        f"segment path, {size:,} rows: Arrow build {arrow:.1f} ms, "
        f"Arrow+COPY+fsync+rename {total:.1f} ms → {size / total * 1000:,.0f} rows/s"
    )


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--distinct", type=int, default=50_000, help="distinct rows built")
    parser.add_argument("--producers", type=int, default=5_000)
    parser.add_argument("--flush-rows", type=int, default=5_000)
    parser.add_argument("--dir", type=Path, default=None, help="output dir (default: tmp)")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="usage-bench-"))
    try:
        t0 = time.perf_counter()
        distinct = make_rows(args.distinct)
        rows = (distinct * (args.rows // len(distinct) + 1))[: args.rows]
        print(f"built {len(distinct):,} UsageRow models in {time.perf_counter() - t0:.2f} s")
        settings = UsageSettings(directory=root, flush_rows=args.flush_rows, flush_age_s=5.0)
        bench_segment_path(distinct, root / "segment", args.flush_rows)
        asyncio.run(bench_flush_stall(distinct, settings, batches=20))
        asyncio.run(bench_receipts(rows, settings))
        asyncio.run(bench_awaited(rows, settings, args.producers))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

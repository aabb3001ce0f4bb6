"""Compaction: merge a closed hour's small segments per instance into one de-duplicated file.

Order of operations, per `date=/hour=/instance=` folder (under an exclusive lock file):

1. list the visible segments once; that list is the set being replaced;
2. `COPY` their de-duplicated union to a hidden temp name, fsync, rename into view, fsync;
3. unlink exactly the listed segments, then fsync the folder.

Guarantee for readers: at every instant the visible files hold every row, so the
`usage` view (and everything built on it) never misses a row and never counts one
twice. `usage_raw` (which by definition shows redelivery duplicates) may, for the
moment between steps 2 and 3, show a merged row next to its small original. A query
that listed the folder before step 3 and opens a removed file after it fails with
"No such file" and can simply be re-run. Segments that land after step 1 (a late
writer) are left alone and merged by a later run.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from consumer.settings.usage import UsageSettings
from consumer.usage import layout
from consumer.usage.catalog import DEDUP_KEY, DEDUP_ORDER
from consumer.usage.segments import copy_to_parquet_atomically, fsync_dir
from schemas.usage import USAGE_COLUMNS

log = logging.getLogger(__name__)

LOCK_NAME = ".compact.lock"


@dataclass(slots=True)
class CompactionReport:
    """What one compaction pass did."""

    folders_compacted: int = 0
    segments_merged: int = 0
    rows_written: int = 0
    duplicates_dropped: int = 0
    folders_skipped_busy: int = 0
    outputs: list[Path] = field(default_factory=list)


def hour_folders(root: Path) -> Iterator[tuple[datetime, Path]]:
    """Every `(hour, instance folder)` under the root, oldest first; the schema seed excluded."""
    if not root.is_dir():
        return
    for date_dir in sorted(root.iterdir()):
        if not date_dir.is_dir():
            continue
        for hour_dir in sorted(date_dir.iterdir()):
            hour = layout.parse_partition_hour(date_dir.name, hour_dir.name)
            if hour is None or not hour_dir.is_dir():
                continue
            for instance_dir in sorted(hour_dir.iterdir()):
                if not instance_dir.name.startswith("instance=") or not instance_dir.is_dir():
                    continue
                if instance_dir.name == f"instance={layout.SCHEMA_INSTANCE}":
                    continue
                yield hour, instance_dir


def needs_compaction(names: list[str]) -> bool:
    """More than one visible segment: there is something to merge."""
    return sum(1 for name in names if layout.is_visible_part(name)) > 1


def compact_folder(folder: Path, compression: str = "zstd") -> tuple[int, int, int, Path] | None:
    """Merge one folder's segments; `(segments, rows in, rows out, merged path)` or None.

    Returns None when there is nothing to merge; raises `BlockingIOError` when another
    compactor holds the folder's lock.
    """
    lock_path = folder / LOCK_NAME
    with open(lock_path, "a+b") as lock_file:
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("usage_compaction_busy", extra={"folder": str(folder)})
            raise
        parts = sorted(p for p in folder.iterdir() if layout.is_visible_part(p.name))
        if len(parts) <= 1:
            return None
        file_list = "[" + ", ".join(layout.sql_string(p) for p in parts) + "]"
        source = f"read_parquet({file_list}, hive_partitioning = false, union_by_name = true)"
        merged = folder / layout.part_name(time.time_ns(), secrets.token_hex(4), compacted=True)
        conn = duckdb.connect(":memory:")
        try:
            rows_in_row = conn.execute(f"SELECT count(*) FROM {source}").fetchone()
            rows_in = int(rows_in_row[0]) if rows_in_row else 0
            # Segments written before a column existed lack it: the merged file has today's
            # columns, in order, the missing ones null.
            present = {
                str(r[0]) for r in conn.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
            }
            columns = ", ".join(
                name if name in present else f"CAST(NULL AS {kind}) AS {name}"
                for name, kind in USAGE_COLUMNS
            )
            select = (
                f"SELECT * FROM (SELECT {columns} FROM {source}) "
                f"QUALIFY row_number() OVER (PARTITION BY {DEDUP_KEY} ORDER BY {DEDUP_ORDER}) = 1 "
                "ORDER BY finished_at"
            )
            copy_to_parquet_atomically(conn, select, merged, compression)
            rows_out_row = conn.execute(
                f"SELECT count(*) FROM read_parquet({layout.sql_string(merged)})"
            ).fetchone()
            rows_out = int(rows_out_row[0]) if rows_out_row else 0
        finally:
            conn.close()
        for part in parts:
            part.unlink(missing_ok=True)
        fsync_dir(folder)
        return len(parts), rows_in, rows_out, merged


def remove_stale_temps(folder: Path, older_than_s: float, now: float | None = None) -> int:
    """Delete hidden temp segments a killed writer left behind; return how many."""
    now = time.time() if now is None else now
    removed = 0
    for path in folder.iterdir():
        if path.name.startswith(".") and path.name.endswith(layout.TEMP_SUFFIX):
            try:
                if now - path.stat().st_mtime >= older_than_s:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


def compact_closed_hours(
    settings: UsageSettings, now: datetime | None = None, *, after_s: float | None = None
) -> CompactionReport:
    """Compact every closed hour of every instance under the usage root."""
    now = datetime.now(UTC) if now is None else now
    after_s = settings.compact_after_s if after_s is None else after_s
    root = Path(settings.directory).absolute()
    report = CompactionReport()
    for hour, folder in hour_folders(root):
        if not layout.is_hour_closed(hour, now, after_s):
            continue
        remove_stale_temps(folder, older_than_s=max(after_s, 60.0))
        names = [p.name for p in folder.iterdir()]
        if not needs_compaction(names):
            continue
        started = time.perf_counter()
        try:
            result = compact_folder(folder, settings.compression)
        except BlockingIOError:
            report.folders_skipped_busy += 1
            continue
        if result is None:
            continue
        segments, rows_in, rows_out, merged = result
        report.folders_compacted += 1
        report.segments_merged += segments
        report.rows_written += rows_out
        report.duplicates_dropped += rows_in - rows_out
        report.outputs.append(merged)
        log.info(
            "usage_compacted",
            extra={
                "folder": str(folder),
                "segments": segments,
                "rows": rows_out,
                "duplicates": rows_in - rows_out,
                "elapsed_ms": round((time.perf_counter() - started) * 1000),
            },
        )
    return report


class PeriodicCompaction:
    """Runs `compact_closed_hours` every `compact_interval_s` in a worker thread."""

    def __init__(self, settings: UsageSettings) -> None:
        self.settings = settings
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Begin the periodic loop (first pass after one interval)."""
        if self._task is None and self.settings.compact_interval_s > 0:
            self._task = asyncio.create_task(self._loop(), name="usage-compaction")

    async def close(self) -> None:
        """Stop after the pass in progress, if any."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _loop(self) -> None:
        interval = self.settings.compact_interval_s
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=interval)
                return
            except TimeoutError:
                pass
            try:
                await asyncio.to_thread(compact_closed_hours, self.settings)
            except (OSError, duckdb.Error) as exc:
                # A failed pass leaves the segments as they were; the next pass retries.
                log.error("usage_compaction_failed", extra={"error": repr(exc)[:300]})

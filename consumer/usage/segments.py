"""Durable Parquet segments: buffered rows → Arrow → DuckDB COPY → fsync → rename → fsync dir."""

from __future__ import annotations

import logging
import operator
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from consumer.usage import layout
from schemas.usage import USAGE_COLUMNS, UsageRow

log = logging.getLogger(__name__)

COLUMN_NAMES: tuple[str, ...] = tuple(name for name, _ in USAGE_COLUMNS)

_ARROW_TYPES: dict[str, pa.DataType] = {
    "VARCHAR": pa.string(),
    "BIGINT": pa.int64(),
    "INTEGER": pa.int32(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMP WITH TIME ZONE": pa.timestamp("us", tz="UTC"),
}

RowValues = tuple[Any, ...]

# One C-level call that pulls a row's values out in storage order.
row_values: Callable[[UsageRow], RowValues] = operator.attrgetter(*COLUMN_NAMES)


def usage_arrow_schema() -> pa.Schema:
    """The Arrow schema every usage segment is written with."""
    return pa.schema([pa.field(name, _ARROW_TYPES[kind]) for name, kind in USAGE_COLUMNS])


USAGE_ARROW_SCHEMA = usage_arrow_schema()


# Rows converted per step. Conversion from Python objects holds the GIL for the length of
# one C call, so the event loop can stall that long; small steps keep that to ~1 ms.
CONVERT_CHUNK_ROWS = 2_048


def rows_to_arrow(rows: Sequence[RowValues]) -> pa.Table:
    """Column-wise Arrow table from row tuples in `COLUMN_NAMES` order."""
    if not rows:
        return USAGE_ARROW_SCHEMA.empty_table()
    batches = []
    for start in range(0, len(rows), CONVERT_CHUNK_ROWS):
        columns = zip(*rows[start : start + CONVERT_CHUNK_ROWS], strict=True)
        arrays = [
            pa.array(column, type=field.type)
            for column, field in zip(columns, USAGE_ARROW_SCHEMA, strict=True)
        ]
        batches.append(pa.RecordBatch.from_arrays(arrays, schema=USAGE_ARROW_SCHEMA))
    return pa.Table.from_batches(batches, schema=USAGE_ARROW_SCHEMA)


def fsync_file(path: Path) -> None:
    """Flush a file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames and creations inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, known: set[Path] | None = None) -> None:
    """Create `path` and parents, fsyncing each parent whose entries changed."""
    if known is not None and path in known:
        return
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            pass
        fsync_dir(directory.parent)
    if known is not None:
        known.add(path)


def copy_to_parquet_atomically(
    conn: duckdb.DuckDBPyConnection, select_sql: str, final_path: Path, compression: str
) -> Path:
    """`COPY (select_sql) TO` a hidden temp name, fsync it, rename it into view, fsync the dir.

    A reader globbing `part-*.parquet` sees either no file or the complete one.
    """
    temp_path = final_path.with_name(layout.temp_name(final_path.name))
    try:
        conn.execute(
            f"COPY ({select_sql}) TO {layout.sql_string(temp_path)} "
            f"(FORMAT parquet, COMPRESSION {compression}, USE_TMP_FILE false)"
        )
        fsync_file(temp_path)
        os.rename(temp_path, final_path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    fsync_dir(final_path.parent)
    return final_path


class SegmentWriter:
    """Writes batches of row tuples as Parquet segments; used from one worker thread at a time."""

    def __init__(self, root: Path, instance_id: str, compression: str = "zstd") -> None:
        self.root = root.absolute()
        self.instance_id = instance_id
        self.compression = compression
        self._conn = duckdb.connect(":memory:")
        self._known_dirs: set[Path] = set()

    def write(self, batches: dict[int, list[RowValues]]) -> list[Path]:
        """Write one segment per UTC hour (keyed by epoch hour); return the visible paths."""
        written: list[Path] = []
        for epoch_hour, rows in sorted(batches.items()):
            if rows:
                written.append(self._write_hour(layout.hour_of_epoch(epoch_hour), rows))
        return written

    def _write_hour(self, hour: Any, rows: Sequence[RowValues]) -> Path:
        started = time.perf_counter()
        directory = layout.partition_dir(self.root, hour, self.instance_id)
        ensure_dir(directory, self._known_dirs)
        final_path = directory / layout.part_name(time.time_ns(), secrets.token_hex(4))
        table = rows_to_arrow(rows)
        self._conn.register("usage_batch", table)
        try:
            copy_to_parquet_atomically(
                self._conn, "SELECT * FROM usage_batch", final_path, self.compression
            )
        finally:
            self._conn.unregister("usage_batch")
        log.debug(
            "usage_segment_written",
            extra={
                "path": str(final_path),
                "rows": len(rows),
                "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        return final_path

    def close(self) -> None:
        """Release the in-memory DuckDB connection."""
        self._conn.close()


def write_rows(
    root: Path, instance_id: str, rows: Iterable[UsageRow], compression: str = "zstd"
) -> list[Path]:
    """Write rows synchronously, one segment per hour (tools and tests; the service batches)."""
    batches: dict[int, list[RowValues]] = {}
    for row in rows:
        batches.setdefault(epoch_hour(row), []).append(row_values(row))
    writer = SegmentWriter(root, instance_id, compression)
    try:
        return writer.write(batches)
    finally:
        writer.close()


def epoch_hour(row: UsageRow) -> int:
    """Hours since 1970 (UTC) of the row's `finished_at`: the partition it lands in."""
    return int(row.finished_at.timestamp()) // 3600

"""Compaction merges closed hours without a reader of `usage` ever missing or doubling a row."""

from __future__ import annotations

import fcntl
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
from usage_writer_loop import make_row

from consumer.usage import UsageSettings, compact_closed_hours, connect_catalog, write_rows
from consumer.usage.compaction import LOCK_NAME
from consumer.usage.layout import is_compacted_part, is_visible_part, partition_dir

NOW = datetime(2025, 6, 1, 12, 30, tzinfo=UTC)
CLOSED = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)
OPEN = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if is_visible_part(p.name))


def count(conn: duckdb.DuckDBPyConnection, sql: str) -> int:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def seed_hour(root: Path, hour: datetime, segments: int, rows_each: int, tag: str) -> None:
    for s in range(segments):
        write_rows(
            root,
            "a",
            [
                make_row(f"{tag}-{s}-{i}", finished_at=hour + timedelta(minutes=s), offset=i)
                for i in range(rows_each)
            ],
        )


def test_closed_hour_becomes_one_deduplicated_file(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path, compact_after_s=600)
    seed_hour(tmp_path, CLOSED, segments=4, rows_each=25, tag="c")
    # A redelivered request logged twice in the same hour.
    write_rows(tmp_path, "a", [make_row("c-0-0", finished_at=CLOSED + timedelta(minutes=40))])
    seed_hour(tmp_path, OPEN, segments=3, rows_each=10, tag="o")
    conn = connect_catalog(settings)
    before = count(conn, "SELECT count(*) FROM usage")
    assert before == 130

    report = compact_closed_hours(settings, now=NOW)

    closed_folder = partition_dir(tmp_path, CLOSED, "a")
    assert len(parts(closed_folder)) == 1 and is_compacted_part(parts(closed_folder)[0])
    assert len(parts(partition_dir(tmp_path, OPEN, "a"))) == 3  # the open hour is left alone
    assert report.folders_compacted == 1 and report.segments_merged == 5
    assert report.rows_written == 100 and report.duplicates_dropped == 1
    assert count(conn, "SELECT count(*) FROM usage") == before
    assert count(conn, "SELECT count(*) FROM usage_raw") == 130
    kept = conn.execute(
        "SELECT minute(finished_at) FROM usage WHERE request_id = 'c-0-0'"
    ).fetchall()
    assert kept == [(0,)]  # the same row the view keeps
    conn.close()


def test_compaction_is_idempotent_and_merges_late_segments_next_time(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path)
    seed_hour(tmp_path, CLOSED, segments=3, rows_each=5, tag="c")
    compact_closed_hours(settings, now=NOW)
    folder = partition_dir(tmp_path, CLOSED, "a")
    only = parts(folder)
    again = compact_closed_hours(settings, now=NOW)
    assert again.folders_compacted == 0 and parts(folder) == only
    write_rows(tmp_path, "a", [make_row("late-1", finished_at=CLOSED + timedelta(minutes=59))])
    late = compact_closed_hours(settings, now=NOW)
    assert late.folders_compacted == 1 and late.rows_written == 16
    assert len(parts(folder)) == 1


def test_folder_locked_by_another_compactor_is_skipped(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path)
    seed_hour(tmp_path, CLOSED, segments=2, rows_each=3, tag="c")
    folder = partition_dir(tmp_path, CLOSED, "a")
    with open(folder / LOCK_NAME, "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        report = compact_closed_hours(settings, now=NOW)
    assert report.folders_skipped_busy == 1 and len(parts(folder)) == 2


def test_stale_temp_files_of_killed_writers_are_removed(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path)
    seed_hour(tmp_path, CLOSED, segments=2, rows_each=3, tag="c")
    folder = partition_dir(tmp_path, CLOSED, "a")
    stale = folder / ".part-00000000000000000001-dead.parquet.tmp"
    stale.write_bytes(b"partial")
    old = (NOW - timedelta(hours=3)).timestamp()

    os.utime(stale, (old, old))
    compact_closed_hours(settings, now=NOW)
    assert not stale.exists()


def test_reader_of_usage_never_sees_a_row_missing_or_twice_during_compaction(
    tmp_path: Path,
) -> None:
    settings = UsageSettings(directory=tmp_path)
    hours = [CLOSED - timedelta(hours=h) for h in range(8)]
    for h, hour in enumerate(hours):
        seed_hour(tmp_path, hour, segments=6, rows_each=20, tag=f"h{h}")
    expected = 8 * 6 * 20
    conn = connect_catalog(settings)
    assert count(conn, "SELECT count(*) FROM usage") == expected
    stop = threading.Event()
    counts: list[int] = []
    vanished: list[str] = []

    def read_loop() -> None:
        reader = connect_catalog(settings)
        try:
            while not stop.is_set():
                try:
                    counts.append(count(reader, "SELECT count(*) FROM usage"))
                except duckdb.IOException as exc:
                    # Documented: a query that listed a file compaction then removed.
                    vanished.append(str(exc))
        finally:
            reader.close()

    thread = threading.Thread(target=read_loop)
    thread.start()
    try:
        report = compact_closed_hours(settings, now=NOW)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert report.folders_compacted == 8
    assert counts, "the reader never completed a query"
    assert set(counts) == {expected}
    assert all("No such file" in v or "No files found" in v for v in vanished), vanished
    assert count(conn, "SELECT count(*) FROM usage") == expected
    assert count(conn, "SELECT count(*) FROM usage_raw") == expected
    conn.close()


def test_segments_older_than_a_column_merge_with_new_ones(tmp_path: Path) -> None:
    """A folder with a segment written before the stage and replay columns existed beside
    new ones compacts into one file with today's columns, in order, old values kept."""
    from schemas.usage import USAGE_COLUMNS

    added = {"bus_ms", "admission_ms", "slot_wait_ms", "prefill_ms", "generation_ms", "replayed"}
    old_columns = ", ".join(name for name, _ in USAGE_COLUMNS if name not in added)
    write_rows(tmp_path, "a", [make_row("old-1", finished_at=CLOSED)])
    write_rows(tmp_path, "a", [make_row("old-2", finished_at=CLOSED + timedelta(minutes=1))])
    folder = partition_dir(tmp_path, CLOSED, "a")
    conn = duckdb.connect()
    for part in parts(folder)[:1]:  # rewrite the first as an old-format segment
        path = folder / part
        conn.execute(
            f"COPY (SELECT {old_columns} FROM read_parquet('{path}')) TO '{path}.old' "
            "(FORMAT parquet)"
        )
        os.replace(f"{path}.old", path)
    conn.close()
    write_rows(
        tmp_path,
        "a",
        [make_row("new-1", finished_at=CLOSED + timedelta(minutes=2)).model_copy(
            update={"slot_wait_ms": 7.0, "replayed": False}
        )],
    )  # fmt: skip

    report = compact_closed_hours(UsageSettings(directory=tmp_path, compact_after_s=600), now=NOW)
    assert report.folders_compacted == 1 and report.rows_written == 3
    (merged,) = parts(folder)
    check = duckdb.connect()
    source = f"read_parquet('{folder / merged}', hive_partitioning = false)"
    names = [r[0] for r in check.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]
    assert names == [name for name, _ in USAGE_COLUMNS]
    rows = check.execute(
        f"SELECT request_id, slot_wait_ms FROM {source} ORDER BY request_id"
    ).fetchall()
    check.close()
    assert ("new-1", 7.0) in rows and ("old-1", None) in rows

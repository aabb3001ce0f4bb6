"""The analysts' catalog: views, de-duplication, compatibility, and readers beside the writer."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
from usage_writer_loop import make_row

from consumer.usage import UsageSettings, UsageWriter, connect_catalog, ensure_catalog, write_rows
from consumer.usage.catalog import CATALOG_STORAGE_VERSION

REPO = Path(__file__).resolve().parents[2]


def count(conn: duckdb.DuckDBPyConnection, sql: str) -> int:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def test_views_bind_before_any_row_exists(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path)
    path = ensure_catalog(settings)
    assert path == tmp_path / "usage.duckdb"
    conn = duckdb.connect(str(path), read_only=True)
    for view in ("usage_raw", "usage", "daily_tenant_usage"):
        assert count(conn, f"SELECT count(*) FROM {view}") == 0
    conn.close()


def test_catalog_uses_a_storage_version_older_duckdb_clis_open(tmp_path: Path) -> None:
    path = ensure_catalog(UsageSettings(directory=tmp_path))
    conn = duckdb.connect()
    conn.execute(f"ATTACH '{path}' AS cat (READ_ONLY)")
    tags = conn.execute(
        "SELECT tags FROM duckdb_databases() WHERE database_name = 'cat'"
    ).fetchone()
    assert tags is not None
    assert tags[0]["storage_version"].startswith(CATALOG_STORAGE_VERSION)
    conn.close()


def test_ensure_catalog_is_idempotent(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path)
    first = ensure_catalog(settings).stat()
    second = ensure_catalog(settings).stat()
    assert (first.st_ino, first.st_mtime_ns) == (second.st_ino, second.st_mtime_ns)


def test_usage_view_keeps_one_row_per_request(tmp_path: Path) -> None:
    t = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)
    write_rows(tmp_path, "a", [make_row("r-1", offset=1, finished_at=t, instance_id="a")])
    # Redelivered after a crash: handled again by another instance, later.
    later = t + timedelta(seconds=30)
    write_rows(tmp_path, "b", [make_row("r-1", offset=1, finished_at=later, instance_id="b")])
    write_rows(
        tmp_path,
        "b",
        [
            make_row("r-1", tenant_id="other-tenant", finished_at=t),  # same id, other tenant
            make_row(None, tenant_id=None, status="error", error_code="validation", offset=7),
            make_row(None, tenant_id=None, status="error", error_code="validation", offset=8),
        ],
    )
    conn = connect_catalog(UsageSettings(directory=tmp_path))
    assert count(conn, "SELECT count(*) FROM usage_raw") == 5
    assert count(conn, "SELECT count(*) FROM usage") == 4
    kept = conn.execute(
        "SELECT instance_id FROM usage WHERE request_id = 'r-1' AND tenant_id = 'acme'"
    ).fetchall()
    assert kept == [("a",)]  # the first-finished row wins
    conn.close()


def test_daily_tenant_usage_aggregates_per_day_tenant_operation(tmp_path: Path) -> None:
    day = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)
    rows = [
        make_row(f"r-{i}", finished_at=day, total_ms=float(100 * (i + 1)), output_tokens=10)
        for i in range(10)
    ]
    rows.append(make_row("q-1", status="error", error_code="quota_exceeded", finished_at=day))
    rows.append(make_row("n-1", finished_at=day + timedelta(days=1)))
    write_rows(tmp_path, "a", rows)
    conn = connect_catalog(UsageSettings(directory=tmp_path))
    got = conn.execute(
        "SELECT day, tenant_id, operation, requests, ok, errors, input_tokens, output_tokens, "
        "p50_ms, p95_ms FROM daily_tenant_usage ORDER BY day"
    ).fetchall()
    conn.close()
    assert got[0][:8] == (date(2025, 6, 1), "acme", "summarize", 11, 10, 1, 1100, 120)
    assert 120.0 <= got[0][8] <= 600.0 and got[0][9] > got[0][8]
    assert got[1][:4] == (date(2025, 6, 2), "acme", "summarize", 1)


async def test_reader_holding_the_catalog_sees_new_segments_while_the_writer_writes(
    tmp_path: Path,
) -> None:
    settings = UsageSettings(directory=tmp_path, flush_rows=50, flush_age_s=0.05)
    ensure_catalog(settings)
    reader_script = textwrap.dedent(
        """
        import sys, time, duckdb
        conn = duckdb.connect(sys.argv[1], read_only=True)
        print("open", flush=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            n = conn.execute("SELECT count(*) FROM usage").fetchone()[0]
            if n >= int(sys.argv[2]):
                print("saw", n, flush=True)
                sys.exit(0)
            time.sleep(0.02)
        sys.exit(1)
        """
    )
    total = 500
    reader = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        reader_script,
        str(tmp_path / "usage.duckdb"),
        str(total),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert reader.stdout is not None
        line = await asyncio.wait_for(reader.stdout.readline(), timeout=30)
        assert line.decode().strip() == "open"
        # A second analyst, in this process, holds it open too.
        analyst = duckdb.connect(str(tmp_path / "usage.duckdb"), read_only=True)
        writer = UsageWriter(settings, "live-1")
        await writer.start()  # refreshes the catalog while both readers hold it
        seen = []
        for start in range(0, total, 50):
            await asyncio.gather(
                *(writer.append(make_row(f"r-{i}", offset=i)) for i in range(start, start + 50))
            )
            seen.append(count(analyst, "SELECT count(*) FROM usage"))
        await writer.close()
        assert seen == list(range(50, total + 1, 50))  # every flush visible at once
        out, _ = await asyncio.wait_for(reader.communicate(), timeout=30)
        assert reader.returncode == 0, out
        assert out.decode().strip() == f"saw {total}"
        analyst.close()
    finally:
        if reader.returncode is None:
            reader.kill()
            await reader.wait()


def test_refresh_replaces_the_catalog_under_an_open_reader(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path)
    path = ensure_catalog(settings)
    write_rows(tmp_path, "a", [make_row("r-1")])
    reader = duckdb.connect(str(path), read_only=True)
    path.unlink()  # as if moved away; the next start must write a fresh one
    began = time.monotonic()
    ensure_catalog(settings)
    assert time.monotonic() - began < 10
    fresh = duckdb.connect(str(path), read_only=True)
    assert count(reader, "SELECT count(*) FROM usage") == 1
    assert count(fresh, "SELECT count(*) FROM usage") == 1
    reader.close()
    fresh.close()


def test_segments_written_before_the_stage_columns_read_beside_new_ones(tmp_path: Path) -> None:
    """An old tree (its schema segment and rows without `bus_ms` …) and new rows: the views
    read both, by column name, the old rows' stages null."""
    from consumer.usage import layout
    from schemas.usage import USAGE_COLUMNS

    stages = {"bus_ms", "admission_ms", "slot_wait_ms", "prefill_ms", "generation_ms", "replayed"}
    old_columns = [(name, kind) for name, kind in USAGE_COLUMNS if name not in stages]
    conn = duckdb.connect()
    old_schema = layout.partition_dir(tmp_path, layout.SCHEMA_HOUR, layout.SCHEMA_INSTANCE)
    old_schema.mkdir(parents=True)
    nulls = ", ".join(f"CAST(NULL AS {kind}) AS {name}" for name, kind in old_columns)
    conn.execute(f"COPY (SELECT {nulls} WHERE false) TO '{old_schema}/part-schema.parquet'")
    t = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)
    old_dir = tmp_path / "date=2025-06-01" / "hour=09" / "instance=old"
    old_dir.mkdir(parents=True)
    values = (
        ", ".join(
            {
                "VARCHAR": "'old'",
                "BIGINT": "1",
                "INTEGER": "1",
                "DOUBLE": "5.0",
                "TIMESTAMP WITH TIME ZONE": f"TIMESTAMPTZ '{t.isoformat()}'",
            }[kind]
            + f" AS {name}"
            for name, kind in old_columns
        )
        .replace("'old' AS status", "'ok' AS status")
        .replace("'old' AS error_code", "NULL AS error_code")
    )
    conn.execute(f"COPY (SELECT {values}) TO '{old_dir}/part-1-old.parquet'")
    conn.close()
    new_row = make_row("r-new", offset=2, finished_at=t, instance_id="new")
    write_rows(tmp_path, "new", [new_row.model_copy(update={"slot_wait_ms": 12.5})])

    reader = connect_catalog(UsageSettings(directory=tmp_path))
    rows = reader.execute(
        "SELECT request_id, total_ms, slot_wait_ms FROM usage ORDER BY request_id"
    ).fetchall()
    reader.close()
    assert rows == [("old", 5.0, None), ("r-new", new_row.total_ms, 12.5)]

"""UsageWriter against real Parquet files: every outcome lands once, and only when durable."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from usage_writer_loop import make_row

from consumer.usage import (
    UsageSettings,
    UsageWriteFailed,
    UsageWriter,
    UsageWriterClosed,
    connect_catalog,
)
from consumer.usage.layout import PART_GLOB


def visible_parts(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(PART_GLOB) if "instance=_schema" not in str(p))


def rows_on_disk(root: Path) -> list[dict[str, Any]]:
    parts = visible_parts(root)
    if not parts:
        return []
    conn = duckdb.connect()
    files = "[" + ", ".join(f"'{p}'" for p in parts) + "]"
    result = conn.execute(
        f"SELECT request_id, status, error_code, tenant_id FROM read_parquet({files}, "
        "hive_partitioning = false)"
    )
    names = [d[0] for d in result.description]
    return [dict(zip(names, r, strict=True)) for r in result.fetchall()]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name.endswith(".tmp")]


async def started(settings: UsageSettings, instance: str = "test-1") -> UsageWriter:
    writer = UsageWriter(settings, instance)
    await writer.start()
    return writer


async def test_every_outcome_leaves_exactly_one_row(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path, flush_rows=100, flush_age_s=0.05)
    writer = await started(settings)
    outcomes = [
        make_row("r-ok"),
        make_row("r-error", status="error", error_code="internal", output_tokens=None),
        make_row("r-quota", status="error", error_code="quota_exceeded", output_tokens=None),
        make_row("r-unauth", status="error", error_code="unauthorized", input_tokens=None),
        make_row("r-late", status="error", error_code="deadline_exceeded", output_tokens=None),
        make_row(
            None, tenant_id=None, operation=None, status="error", error_code="validation", offset=9
        ),
    ]
    await asyncio.gather(*(writer.append(row) for row in outcomes))
    await writer.close()

    conn = connect_catalog(settings)
    got = conn.execute(
        "SELECT coalesce(request_id, 'dlq'), status, error_code FROM usage ORDER BY 1"
    ).fetchall()
    conn.close()
    assert got == [
        ("dlq", "error", "validation"),
        ("r-error", "error", "internal"),
        ("r-late", "error", "deadline_exceeded"),
        ("r-ok", "ok", None),
        ("r-quota", "error", "quota_exceeded"),
        ("r-unauth", "error", "unauthorized"),
    ]


async def test_append_returns_only_once_the_row_is_in_a_visible_segment(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path, flush_rows=1_000, flush_age_s=0.1)
    writer = await started(settings)
    task = asyncio.create_task(writer.append(make_row("r-1")))
    await asyncio.sleep(0)
    assert not task.done() and rows_on_disk(tmp_path) == []
    await asyncio.wait_for(task, timeout=5)
    assert [r["request_id"] for r in rows_on_disk(tmp_path)] == ["r-1"]
    assert temp_files(tmp_path) == []
    await writer.close()


async def test_concurrent_appenders_share_one_flush(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path, flush_rows=200, flush_age_s=30)
    writer = await started(settings)
    await asyncio.wait_for(
        asyncio.gather(*(writer.append(make_row(f"r-{i}", offset=i)) for i in range(200))),
        timeout=10,
    )
    assert writer.segments_written == 1
    assert len(visible_parts(tmp_path)) == 1
    assert len(rows_on_disk(tmp_path)) == 200
    await writer.close()


async def test_age_timer_flushes_a_partial_batch(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path, flush_rows=10_000, flush_age_s=0.3)
    writer = await started(settings)
    began = time.monotonic()
    await asyncio.wait_for(
        asyncio.gather(*(writer.append(make_row(f"r-{i}")) for i in range(3))), timeout=10
    )
    waited = time.monotonic() - began
    assert 0.25 <= waited < 5
    assert len(rows_on_disk(tmp_path)) == 3
    await writer.close()


async def test_flush_makes_pending_rows_durable_now(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path, flush_rows=10_000, flush_age_s=600)
    writer = await started(settings)
    receipt = writer.append_nowait(make_row("r-1"))
    assert not receipt.done()
    await asyncio.wait_for(writer.flush(), timeout=5)
    assert receipt.done()
    assert [r["request_id"] for r in rows_on_disk(tmp_path)] == ["r-1"]
    await writer.close()


async def test_receipt_callbacks_report_durability(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path, flush_rows=2, flush_age_s=600)
    writer = await started(settings)
    seen: list[BaseException | None] = []
    receipt = writer.append_nowait(make_row("r-1"))
    receipt.add_done_callback(seen.append)
    writer.append_nowait(make_row("r-2"))
    await asyncio.wait_for(receipt.wait(), timeout=5)
    assert seen == [None]
    late: list[BaseException | None] = []
    receipt.add_done_callback(late.append)
    assert late == [None]
    await writer.close()


async def test_close_flushes_and_later_appends_are_refused(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path, flush_rows=10_000, flush_age_s=600)
    writer = await started(settings)
    receipt = writer.append_nowait(make_row("r-1"))
    await asyncio.wait_for(writer.close(), timeout=5)
    assert receipt.done() and receipt.error is None
    assert len(rows_on_disk(tmp_path)) == 1
    with pytest.raises(UsageWriterClosed):
        await writer.append(make_row("r-2"))


async def test_rows_of_different_hours_go_to_their_own_partitions(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path, flush_rows=2, flush_age_s=600)
    writer = await started(settings, "host/1")
    t = datetime(2025, 6, 1, 9, 59, 59, tzinfo=UTC)
    await asyncio.gather(
        writer.append(make_row("a", finished_at=t)),
        writer.append(make_row("b", finished_at=t + timedelta(seconds=2))),
    )
    await writer.close()
    folders = sorted(str(p.parent.relative_to(tmp_path)) for p in visible_parts(tmp_path))
    assert folders == [
        "date=2025-06-01/hour=09/instance=host_1",
        "date=2025-06-01/hour=10/instance=host_1",
    ]


async def test_failed_flush_fails_every_appender_and_the_writer_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = UsageSettings(directory=tmp_path, flush_rows=3, flush_age_s=600)
    writer = await started(settings)
    real_write = writer._segments.write
    calls = 0

    def failing_once(batches: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(28, "No space left on device")
        return real_write(batches)

    monkeypatch.setattr(writer._segments, "write", failing_once)
    results = await asyncio.gather(
        *(writer.append(make_row(f"r-{i}")) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, UsageWriteFailed) for r in results)
    assert rows_on_disk(tmp_path) == []
    await asyncio.gather(*(writer.append(make_row(f"s-{i}")) for i in range(3)))
    assert len(rows_on_disk(tmp_path)) == 3
    await writer.close()


async def test_cancelling_one_appender_does_not_cancel_its_batch(tmp_path: Path) -> None:
    settings = UsageSettings(directory=tmp_path, flush_rows=10_000, flush_age_s=0.3)
    writer = await started(settings)
    first = asyncio.create_task(writer.append(make_row("r-1")))
    second = asyncio.create_task(writer.append(make_row("r-2")))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.wait_for(second, timeout=5)
    assert first.cancelled()
    assert sorted(r["request_id"] for r in rows_on_disk(tmp_path)) == ["r-1", "r-2"]
    await writer.close()

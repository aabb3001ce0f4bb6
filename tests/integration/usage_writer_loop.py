"""Test helper: runs a UsageWriter appending rows forever; prints what is durable.

Usage: python usage_writer_loop.py DIRECTORY INSTANCE_ID [BATCH_ROWS]
Each line `durable <prefix> <count>` means rows `<prefix>-0 … <prefix>-<count-1>` are on
disk (their `append` returned). The integration tests SIGKILL this process at random.
Also imported by the tests for `make_row`.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from consumer.usage import UsageSettings, UsageWriter
from schemas.usage import UsageRow


def make_row(
    request_id: str | None,
    *,
    tenant_id: str | None = "acme",
    status: Literal["ok", "error"] = "ok",
    error_code: str | None = None,
    offset: int = 0,
    finished_at: datetime | None = None,
    instance_id: str = "test-1",
    operation: str | None = "summarize",
    input_tokens: int | None = 100,
    output_tokens: int | None = 20,
    total_ms: float = 120.0,
) -> UsageRow:
    """A valid usage row; the defaults describe an ok summarize request."""
    finished = finished_at or datetime.now(UTC)
    return UsageRow(
        tenant_id=tenant_id,
        operation=operation,
        model="qwen2.5-7b" if status == "ok" else None,
        status=status,
        error_code=error_code,
        input_chars=400,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        queue_ms=2.0,
        execution_ms=total_ms - 2.0 if status == "ok" else None,
        total_ms=total_ms,
        request_id=request_id,
        correlation_id=request_id,
        kafka_topic="ops.requests.v1",
        kafka_partition=offset % 4,
        kafka_offset=offset,
        instance_id=instance_id,
        received_at=finished - timedelta(milliseconds=total_ms),
        finished_at=finished,
    )


async def run(directory: Path, instance_id: str, batch_rows: int) -> None:
    settings = UsageSettings(directory=directory, flush_rows=batch_rows, flush_age_s=0.05)
    writer = UsageWriter(settings, instance_id)
    await writer.start()
    prefix = f"{instance_id}-{os.getpid()}"
    print(f"started {prefix}", flush=True)
    count = 0
    while True:
        receipt = None
        for _ in range(batch_rows):
            receipt = writer.append_nowait(make_row(f"{prefix}-{count}", offset=count))
            count += 1
        assert receipt is not None
        await receipt.wait()
        print(f"durable {prefix} {count}", flush=True)


if __name__ == "__main__":
    rows_per_batch = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
    asyncio.run(run(Path(sys.argv[1]), sys.argv[2], rows_per_batch))

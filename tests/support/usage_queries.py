"""The usage log as an analyst reads it: SQL over the catalog, opened read-only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

from tests.support.waiting import wait_until_blocking


def query_usage(
    usage_dir: Path, sql: str, params: list[Any] | None = None
) -> list[tuple[Any, ...]]:
    """Run `sql` against the analysts' catalog, opened read-only like an analyst would."""
    conn = duckdb.connect(str(usage_dir / "usage.duckdb"), read_only=True)
    try:
        return conn.execute(sql, params or []).fetchall()
    finally:
        conn.close()


def wait_usage(
    usage_dir: Path, sql: str, done: Callable[[list[tuple[Any, ...]]], bool], timeout_s: float
) -> list[tuple[Any, ...]]:
    """Re-run `sql` until `done(rows)` (rows are flushed in batches, a little later); the
    last rows, done or not."""
    last: list[list[tuple[Any, ...]]] = [[]]

    def finished() -> bool:
        last[0] = query_usage(usage_dir, sql)
        return done(last[0])

    wait_until_blocking(finished, timeout_s, interval_s=0.2, raise_on_timeout=False)
    return last[0]

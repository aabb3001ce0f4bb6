"""The analysts' catalog: `usage.duckdb`, a small file of views over the Parquet tree.

The service never holds the catalog open. It is rebuilt under a hidden temp name and
renamed over the old one, so analysts can keep it open read-only (any number of them)
while the service writes segments and even while the catalog is refreshed: an open
connection keeps the file it opened. The views glob the tree at query time, so new
segments appear without a refresh.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import duckdb

from consumer.settings.usage import UsageSettings
from consumer.usage import layout
from consumer.usage.segments import copy_to_parquet_atomically, ensure_dir, fsync_dir, fsync_file
from schemas.usage import USAGE_COLUMNS

log = logging.getLogger(__name__)

CATALOG_NAME = "usage.duckdb"
# Storage format 64, readable by every DuckDB from 0.10 to today (2.0 writes 69 by default,
# which DuckDB 1.x CLIs refuse to open).
CATALOG_STORAGE_VERSION = "v1.0.0"
CATALOG_FORMAT = 1

# A redelivered request keeps its first-finished row; a message without a request id
# (dead-lettered before it was decoded) is identified by where it sat on the bus. A replay
# (a retry answered with a stored reply) is one row beside its original's per retry: per
# correlation id, so a retry redelivered or forwarded twice after a crash counts once.
_BUS_PLACE = "kafka_topic || '/' || kafka_partition || '/' || kafka_offset"
DEDUP_KEY = (
    "tenant_id, CASE WHEN coalesce(replayed, false) "
    "THEN 'replay:' || coalesce(request_id, '') || ':' || "
    f"coalesce(correlation_id, {_BUS_PLACE}) "
    f"ELSE coalesce(request_id, 'kafka:' || {_BUS_PLACE}) END"
)
DEDUP_ORDER = "finished_at, received_at, instance_id, kafka_topic, kafka_partition, kafka_offset"


def catalog_path(settings: UsageSettings) -> Path:
    """Where `usage.duckdb` lives: in the root of the usage tree."""
    return Path(settings.directory).absolute() / CATALOG_NAME


def segment_glob(root: Path) -> str:
    """The absolute glob the views read."""
    return str(root.absolute() / layout.PART_GLOB)


def view_statements(root: Path) -> list[str]:
    """The CREATE VIEW statements of the catalog, for a given usage root."""
    glob = layout.sql_string(segment_glob(root))
    return [
        "CREATE OR REPLACE VIEW usage_raw AS "
        "SELECT * EXCLUDE (instance) FROM read_parquet("
        f"{glob}, hive_partitioning = true, union_by_name = true, "
        "hive_types = {'date': DATE, 'hour': INTEGER, 'instance': VARCHAR})",
        "CREATE OR REPLACE VIEW usage AS SELECT * FROM usage_raw "
        f"QUALIFY row_number() OVER (PARTITION BY {DEDUP_KEY} ORDER BY {DEDUP_ORDER}) = 1",
        "CREATE OR REPLACE VIEW daily_tenant_usage AS SELECT "
        "date AS day, tenant_id, operation, "
        "count(*) FILTER (WHERE NOT coalesce(replayed, false)) AS requests, "
        "count(*) FILTER (WHERE status = 'ok' AND NOT coalesce(replayed, false)) AS ok, "
        "count(*) FILTER (WHERE status = 'error' AND NOT coalesce(replayed, false)) AS errors, "
        "coalesce(sum(input_tokens), 0) AS input_tokens, "
        "coalesce(sum(output_tokens), 0) AS output_tokens, "
        "quantile_cont(total_ms, 0.5) AS p50_ms, "
        "quantile_cont(total_ms, 0.95) AS p95_ms, "
        "count(*) FILTER (WHERE replayed) AS replays "
        "FROM usage GROUP BY ALL",
    ]


def _fingerprint(statements: list[str]) -> str:
    payload = "\n".join([str(CATALOG_FORMAT), CATALOG_STORAGE_VERSION, *statements])
    return hashlib.sha256(payload.encode()).hexdigest()


def _current_fingerprint(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        conn = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        log.warning("usage_catalog_unreadable", extra={"path": str(path), "error": repr(exc)[:300]})
        return None
    try:
        row = conn.execute(
            "SELECT value FROM opstream_catalog WHERE key = 'fingerprint'"
        ).fetchone()
    except duckdb.Error:
        return None
    finally:
        conn.close()
    return str(row[0]) if row else None


def ensure_schema_segment(root: Path, compression: str = "zstd") -> Path:
    """Write the zero-row segment that lets the views bind before the first real row.

    It pins every column of today's row, so segments written before a column was added
    (read by name, the missing column null) and after it read as one table.
    """
    directory = layout.partition_dir(root, layout.SCHEMA_HOUR, layout.SCHEMA_INSTANCE)
    final_path = directory / f"{layout.PART_PREFIX}schema{layout.PART_SUFFIX}"
    conn = duckdb.connect(":memory:")
    if final_path.exists():
        try:
            described = conn.execute(
                f"DESCRIBE SELECT * FROM read_parquet({layout.sql_string(final_path)})"
            ).fetchall()
        finally:
            conn.close()
        if [str(row[0]) for row in described] == [name for name, _ in USAGE_COLUMNS]:
            return final_path
        conn = duckdb.connect(":memory:")  # an older schema: written again, atomically
    ensure_dir(directory)
    columns = ", ".join(f"CAST(NULL AS {kind}) AS {name}" for name, kind in USAGE_COLUMNS)
    try:
        copy_to_parquet_atomically(conn, f"SELECT {columns} WHERE false", final_path, compression)
    finally:
        conn.close()
    return final_path


def ensure_catalog(settings: UsageSettings) -> Path:
    """Create or refresh `usage.duckdb` (idempotent; safe while analysts hold it open)."""
    root = Path(settings.directory).absolute()
    ensure_dir(root)
    ensure_schema_segment(root, settings.compression)
    path = root / CATALOG_NAME
    statements = view_statements(root)
    fingerprint = _fingerprint(statements)
    if _current_fingerprint(path) == fingerprint:
        return path
    temp_path = root / f".{CATALOG_NAME}.{os.getpid()}{layout.TEMP_SUFFIX}"
    temp_path.unlink(missing_ok=True)
    conn = duckdb.connect(":memory:")
    try:
        conn.execute(
            f"ATTACH {layout.sql_string(temp_path)} AS catalog "
            f"(STORAGE_VERSION {layout.sql_string(CATALOG_STORAGE_VERSION)})"
        )
        conn.execute("USE catalog")
        for statement in statements:
            conn.execute(statement)
        conn.execute("CREATE TABLE opstream_catalog (key VARCHAR PRIMARY KEY, value VARCHAR)")
        conn.execute(
            "INSERT INTO opstream_catalog VALUES ('fingerprint', ?), ('format', ?), ('root', ?)",
            [fingerprint, str(CATALOG_FORMAT), str(root)],
        )
        conn.execute("USE memory")
        conn.execute("DETACH catalog")
    except BaseException:
        conn.close()
        temp_path.unlink(missing_ok=True)
        Path(f"{temp_path}.wal").unlink(missing_ok=True)
        raise
    conn.close()
    fsync_file(temp_path)
    os.replace(temp_path, path)
    fsync_dir(root)
    log.info(
        "usage_catalog_written",
        extra={"path": str(path), "storage_version": CATALOG_STORAGE_VERSION},
    )
    return path


def connect_catalog(settings: UsageSettings) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the catalog, creating the catalog first if it is missing."""
    path = catalog_path(settings)
    if not path.exists():
        ensure_catalog(settings)
    return duckdb.connect(str(path), read_only=True)

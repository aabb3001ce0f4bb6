"""The usage log: one row per request in Parquet segments, read through a DuckDB catalog."""

from consumer.settings.usage import UsageSettings
from consumer.usage.catalog import catalog_path, connect_catalog, ensure_catalog
from consumer.usage.compaction import CompactionReport, PeriodicCompaction, compact_closed_hours
from consumer.usage.report import run_query, usage_report
from consumer.usage.segments import usage_arrow_schema, write_rows
from consumer.usage.writer import UsageWriteFailed, UsageWriter, UsageWriterClosed

__all__ = [
    "CompactionReport",
    "PeriodicCompaction",
    "UsageSettings",
    "UsageWriteFailed",
    "UsageWriter",
    "UsageWriterClosed",
    "catalog_path",
    "compact_closed_hours",
    "connect_catalog",
    "ensure_catalog",
    "run_query",
    "usage_arrow_schema",
    "usage_report",
    "write_rows",
]

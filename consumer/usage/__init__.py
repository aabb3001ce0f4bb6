"""The usage log: one row per request in Parquet segments, read through a DuckDB catalog.

Names are imported from their modules on first use (PEP 562), so importing the package
stays cheap for the CLI.
"""

from __future__ import annotations

from consumer.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "CompactionReport": "consumer.usage.compaction",
    "PeriodicCompaction": "consumer.usage.compaction",
    "UsageSettings": "consumer.settings.usage",
    "UsageWriteFailed": "consumer.usage.writer",
    "UsageWriter": "consumer.usage.writer",
    "UsageWriterClosed": "consumer.usage.writer",
    "catalog_path": "consumer.usage.catalog",
    "compact_closed_hours": "consumer.usage.compaction",
    "connect_catalog": "consumer.usage.catalog",
    "ensure_catalog": "consumer.usage.catalog",
    "run_query": "consumer.usage.report",
    "usage_arrow_schema": "consumer.usage.segments",
    "usage_report": "consumer.usage.report",
    "write_rows": "consumer.usage.segments",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

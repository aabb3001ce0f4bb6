"""`opstream usage …`: report, query, compact and (re)build the analysts' catalog."""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consumer.cli.table import format_table
from consumer.settings import Settings

# DuckDB and pyarrow load when a usage command runs, not for `opstream --help`.
if TYPE_CHECKING:
    import pyarrow as pa


def format_result(table: pa.Table) -> str:
    """A query result as the CLI's table, numbers right-aligned, then its row count."""
    from consumer.usage.report import display_rows

    rows, numeric = display_rows(table)
    count = f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})"
    return format_table(table.column_names, rows, right=numeric) + "\n" + count


def _usage_dir_override(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    if getattr(args, "usage_dir", None) is not None:
        overrides.setdefault("usage", {})["directory"] = args.usage_dir


def _add_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        dest="usage_dir",
        type=Path,
        default=None,
        help="usage root holding date=…/ and usage.duckdb (env OPSTREAM_USAGE__DIRECTORY)",
    )
    parser.set_defaults(settings_overrides=[_usage_dir_override])


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    """Print a usage summary; optionally draw it as a PNG chart or an HTML page."""
    import duckdb

    from consumer.usage.report import draw_tokens_chart, html_report, usage_report

    try:
        table = usage_report(settings.usage, args.by, args.since, args.tenant)
        print(format_result(table))
        if args.chart is not None:
            tenants = draw_tokens_chart(settings.usage, args.chart, args.since, args.tenant)
            print(f"chart: {args.chart} ({tenants} tenant series)")
        if args.html is not None:
            page = html_report(settings.usage, args.since, args.tenant)
            args.html.parent.mkdir(parents=True, exist_ok=True)
            args.html.write_text(page, encoding="utf-8")
            print(f"report: {args.html}")
    except duckdb.Error as exc:
        print(f"opstream usage report: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        print(
            "opstream usage report: --chart and --html draw with matplotlib: "
            "pip install 'opstream[analyst]'",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    """Run SQL against the views and print the result."""
    import duckdb

    from consumer.usage.report import format_csv, run_query

    try:
        table = run_query(settings.usage, args.sql)
    except duckdb.Error as exc:
        print(f"opstream usage query: {exc}", file=sys.stderr)
        return 1
    if args.format == "csv":
        print(format_csv(table), end="")
    else:
        print(format_result(table))
    return 0


def cmd_compact(args: argparse.Namespace, settings: Settings) -> int:
    """Merge every closed hour's segments into one de-duplicated file per instance."""
    from consumer.usage.compaction import compact_closed_hours

    report = compact_closed_hours(settings.usage, after_s=args.after_s)
    print(
        f"compacted {report.folders_compacted} folder(s): {report.segments_merged} segments → "
        f"{report.rows_written} rows, {report.duplicates_dropped} duplicate(s) dropped"
        + (f", {report.folders_skipped_busy} busy" if report.folders_skipped_busy else "")
    )
    return 0


def cmd_catalog(args: argparse.Namespace, settings: Settings) -> int:
    """Create or refresh usage.duckdb and print its path."""
    from consumer.usage.catalog import ensure_catalog

    print(ensure_catalog(settings.usage))
    return 0


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add `opstream usage` and its subcommands."""
    usage = subparsers.add_parser(
        "usage", help="query, report on and compact the usage log (DuckDB/Parquet)"
    )
    commands = usage.add_subparsers(dest="usage_command", required=True, metavar="SUBCOMMAND")

    report = commands.add_parser("report", parents=[common], help="print a usage summary table")
    _add_dir_option(report)
    report.add_argument("--since", type=date.fromisoformat, default=None, help="YYYY-MM-DD (UTC)")
    report.add_argument("--tenant", default=None, help="only this tenant")
    report.add_argument("--by", choices=["day", "tenant", "operation"], default="day")
    report.add_argument(
        "--chart", type=Path, default=None, help="also draw tokens per tenant per day to FILE.png"
    )
    report.add_argument(
        "--html",
        type=Path,
        default=None,
        help="also write the report page (charts and tables, one offline file) to FILE.html",
    )
    report.set_defaults(func=cmd_report)

    query = commands.add_parser(
        "query",
        parents=[common],
        help="run SQL against the views usage, usage_raw, daily_tenant_usage",
    )
    _add_dir_option(query)
    query.add_argument("sql", help='e.g. "SELECT * FROM daily_tenant_usage"')
    query.add_argument("--format", choices=["table", "csv"], default="table")
    query.set_defaults(func=cmd_query)

    compact = commands.add_parser(
        "compact", parents=[common], help="merge closed hours into one file per instance"
    )
    _add_dir_option(compact)
    compact.add_argument(
        "--after-s",
        type=float,
        default=None,
        help="an hour is closed this long after it ends (default: usage.compact_after_s)",
    )
    compact.set_defaults(func=cmd_compact)

    catalog = commands.add_parser(
        "catalog", parents=[common], help="create or refresh usage.duckdb"
    )
    _add_dir_option(catalog)
    catalog.set_defaults(func=cmd_catalog)

"""Analyst reports over the catalog: summary tables, ad-hoc SQL and a tokens-per-tenant chart."""

from __future__ import annotations

import csv
import io
from datetime import date
from pathlib import Path
from typing import Any, Literal

import duckdb
import pyarrow as pa

from consumer.settings.usage import UsageSettings
from consumer.usage.catalog import connect_catalog

ReportBy = Literal["day", "tenant", "operation"]
REPORT_KEYS: dict[str, str] = {"day": "date", "tenant": "tenant_id", "operation": "operation"}
CHART_MAX_TENANTS = 12


def report_sql(by: ReportBy, since: date | None, tenant: str | None) -> tuple[str, list[Any]]:
    """The summary query for `opstream usage report` and its parameters."""
    key = REPORT_KEYS[by]
    where: list[str] = []
    params: list[Any] = []
    if since is not None:
        where.append("date >= ?")
        params.append(since)
    if tenant is not None:
        where.append("tenant_id = ?")
        params.append(tenant)
    where_sql = f"WHERE {' AND '.join(where)} " if where else ""
    sql = (
        f"SELECT {key} AS {by}, count(*) AS requests, "
        "count(*) FILTER (WHERE status = 'ok') AS ok, "
        "count(*) FILTER (WHERE status = 'error') AS errors, "
        "coalesce(sum(input_tokens), 0) AS input_tokens, "
        "coalesce(sum(output_tokens), 0) AS output_tokens, "
        "round(quantile_cont(total_ms, 0.5), 1) AS p50_ms, "
        "round(quantile_cont(total_ms, 0.95), 1) AS p95_ms "
        f"FROM usage {where_sql}GROUP BY 1 ORDER BY 1 NULLS LAST"
    )
    return sql, params


def chart_sql(since: date | None, tenant: str | None) -> tuple[str, list[Any]]:
    """Tokens (in + out) per tenant per day, for the chart."""
    where = ["tenant_id IS NOT NULL"]
    params: list[Any] = []
    if since is not None:
        where.append("date >= ?")
        params.append(since)
    if tenant is not None:
        where.append("tenant_id = ?")
        params.append(tenant)
    sql = (
        "SELECT date AS day, tenant_id, "
        "coalesce(sum(input_tokens), 0) + coalesce(sum(output_tokens), 0) AS tokens "
        f"FROM usage WHERE {' AND '.join(where)} GROUP BY ALL ORDER BY day, tenant_id"
    )
    return sql, params


def fetch_table(
    conn: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None
) -> pa.Table:
    """Run a query and return its result as Arrow (no per-value Python conversion)."""
    result = conn.sql(sql, params=params or None).arrow()
    if isinstance(result, pa.RecordBatchReader):
        return result.read_all()
    return result


def _as_text(column: pa.ChunkedArray) -> list[str]:
    """Each value as text; nested values (lists, structs) in their Python form."""
    if pa.types.is_string(column.type):
        return ["" if v is None else str(v) for v in column.to_pylist()]
    try:
        as_text = column.cast(pa.string())
    except pa.ArrowNotImplementedError:
        return ["" if v is None else str(v) for v in column.to_pylist()]
    return ["" if v is None else str(v) for v in as_text.to_pylist()]


def _cells(column: pa.ChunkedArray) -> list[str]:
    if pa.types.is_floating(column.type):
        return ["" if v is None else f"{v:,.1f}" for v in column.to_pylist()]
    if pa.types.is_integer(column.type) or (
        pa.types.is_decimal(column.type) and getattr(column.type, "scale", 1) == 0
    ):
        return ["" if v is None else f"{int(v):,}" for v in column.to_pylist()]
    return _as_text(column)


def display_rows(table: pa.Table) -> tuple[list[list[str]], set[int]]:
    """The rows as display text (numbers with thousands separators) and the numeric columns."""
    columns = [_cells(table.column(i)) for i in range(table.num_columns)]
    numeric = {
        i
        for i, f in enumerate(table.schema)
        if pa.types.is_integer(f.type)
        or pa.types.is_floating(f.type)
        or pa.types.is_decimal(f.type)
    }
    return [[col[r] for col in columns] for r in range(table.num_rows)], numeric


def format_csv(table: pa.Table) -> str:
    """The result as CSV with a header row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.column_names)
    columns = [_as_text(table.column(i)) for i in range(table.num_columns)]
    for r in range(table.num_rows):
        writer.writerow([col[r] for col in columns])
    return buffer.getvalue()


def usage_report(
    settings: UsageSettings,
    by: ReportBy = "day",
    since: date | None = None,
    tenant: str | None = None,
) -> pa.Table:
    """The summary table `opstream usage report` prints."""
    sql, params = report_sql(by, since, tenant)
    conn = connect_catalog(settings)
    try:
        return fetch_table(conn, sql, params)
    finally:
        conn.close()


def run_query(settings: UsageSettings, sql: str) -> pa.Table:
    """Run analyst SQL against the catalog's views, read-only."""
    conn = connect_catalog(settings)
    try:
        return fetch_table(conn, sql)
    finally:
        conn.close()


def draw_tokens_chart(
    settings: UsageSettings, path: Path, since: date | None = None, tenant: str | None = None
) -> int:
    """Draw tokens per tenant per day to a PNG; return how many tenants it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sql, params = chart_sql(since, tenant)
    conn = connect_catalog(settings)
    try:
        rows = fetch_table(conn, sql, params).to_pylist()
    finally:
        conn.close()
    series: dict[str, dict[date, int]] = {}
    for row in rows:
        series.setdefault(str(row["tenant_id"]), {})[row["day"]] = int(row["tokens"])
    ranked = sorted(series, key=lambda t: sum(series[t].values()), reverse=True)
    shown = ranked[:CHART_MAX_TENANTS]
    if len(ranked) > CHART_MAX_TENANTS:
        other: dict[date, int] = {}
        for name in ranked[CHART_MAX_TENANTS:]:
            for day, tokens in series[name].items():
                other[day] = other.get(day, 0) + tokens
        series["(other)"] = other
        shown.append("(other)")
    figure, axes = plt.subplots(figsize=(10, 5))
    try:
        for name in shown:
            days: list[Any] = sorted(series[name])
            axes.plot(days, [series[name][d] for d in days], marker="o", label=name)
        axes.set_title("Tokens (input + output) per tenant per day (UTC)")
        axes.set_xlabel("day")
        axes.set_ylabel("tokens")
        if shown:
            axes.legend(loc="upper left", fontsize="small")
        else:
            axes.text(0.5, 0.5, "no usage in range", ha="center", va="center")
        figure.autofmt_xdate()
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return len(shown)

"""Analyst reports over the catalog: summary tables, ad-hoc SQL and a tokens-per-tenant chart."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

import duckdb
import pyarrow as pa

from consumer.pipeline.outcome import STACKED_STAGES
from consumer.settings.usage import UsageSettings
from consumer.usage.catalog import connect_catalog

ReportBy = Literal["day", "tenant", "operation"]
REPORT_KEYS: dict[str, str] = {"day": "date", "tenant": "tenant_id", "operation": "operation"}
CHART_MAX_TENANTS = 12
TOP_TENANTS = 10


def _filters(since: date | None, tenant: str | None, *conditions: str) -> tuple[str, list[Any]]:
    """`WHERE …` for the report's filters (values bound, never spliced), or ''."""
    where = list(conditions)
    params: list[Any] = []
    if since is not None:
        where.append("date >= ?")
        params.append(since)
    if tenant is not None:
        where.append("tenant_id = ?")
        params.append(tenant)
    return (f"WHERE {' AND '.join(where)} " if where else ""), params


def report_sql(by: ReportBy, since: date | None, tenant: str | None) -> tuple[str, list[Any]]:
    """The summary query for `opstream usage report` and its parameters."""
    key = REPORT_KEYS[by]
    where_sql, params = _filters(since, tenant)
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
    where_sql, params = _filters(since, tenant, "tenant_id IS NOT NULL")
    sql = (
        "SELECT date AS day, tenant_id, "
        "(coalesce(sum(input_tokens), 0) + coalesce(sum(output_tokens), 0))::BIGINT AS tokens "
        f"FROM usage {where_sql}GROUP BY ALL ORDER BY day, tenant_id"
    )
    return sql, params


def page_queries(since: date | None, tenant: str | None) -> dict[str, tuple[str, list[Any]]]:
    """The queries behind the HTML report, by `UsagePage` field."""
    where_sql, params = _filters(since, tenant)
    rejected_sql, rejected_params = _filters(since, tenant, "error_code = 'quota_exceeded'")
    tenants_sql, tenants_params = _filters(since, tenant, "tenant_id IS NOT NULL")
    # Rows with stages (written since they exist), replays aside: they ran nothing here.
    staged_sql, staged_params = _filters(
        since, tenant, "bus_ms IS NOT NULL", "NOT coalesce(replayed, false)"
    )
    stage_means = ", ".join(
        f"round(coalesce(avg({stage}_ms), 0), 1) AS {stage}_ms" for stage in STACKED_STAGES
    )
    return {
        "tokens": chart_sql(since, tenant),
        "operations": (
            "SELECT coalesce(operation, '(none)') AS operation, count(*) AS requests, "
            "count(*) FILTER (WHERE status = 'ok') AS ok, "
            "count(*) FILTER (WHERE status = 'error') AS errors, "
            "round(100.0 * count(*) FILTER (WHERE status = 'error') / count(*), 1) AS error_pct "
            f"FROM usage {where_sql}GROUP BY 1 ORDER BY requests DESC, operation",
            params,
        ),
        "latency": (
            "SELECT date AS day, count(*) AS requests, "
            "round(quantile_cont(total_ms, 0.5), 1) AS p50_ms, "
            "round(quantile_cont(total_ms, 0.95), 1) AS p95_ms "
            f"FROM usage {where_sql}GROUP BY 1 ORDER BY 1",
            params,
        ),
        "rejections": (
            "SELECT date AS day, coalesce(tenant_id, '(none)') AS tenant_id, "
            f"count(*) AS rejections FROM usage {rejected_sql}GROUP BY ALL ORDER BY day, tenant_id",
            rejected_params,
        ),
        "stages": (
            f"SELECT coalesce(operation, '(none)') AS operation, count(*) AS requests, "
            f"{stage_means}, round(avg(total_ms), 1) AS total_ms "
            f"FROM usage {staged_sql}GROUP BY 1 ORDER BY total_ms DESC, operation",
            staged_params,
        ),
        "top_tenants": (
            "SELECT tenant_id AS tenant, count(*) AS requests, "
            "count(*) FILTER (WHERE status = 'error') AS errors, "
            "coalesce(sum(input_tokens), 0)::BIGINT AS input_tokens, "
            "coalesce(sum(output_tokens), 0)::BIGINT AS output_tokens, "
            "(coalesce(sum(input_tokens), 0) + coalesce(sum(output_tokens), 0))::BIGINT AS tokens "
            f"FROM usage {tenants_sql}GROUP BY 1 ORDER BY tokens DESC, requests DESC, tenant "
            f"LIMIT {TOP_TENANTS}",
            tenants_params,
        ),
    }


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


def html_report(
    settings: UsageSettings, since: date | None = None, tenant: str | None = None
) -> str:
    """The usage report page (`opstream usage report --html`) as one HTML document."""
    from consumer.usage.html_report import UsagePage, render_page

    conn = connect_catalog(settings)
    try:
        rows = {
            name: fetch_table(conn, sql, params).to_pylist()
            for name, (sql, params) in page_queries(since, tenant).items()
        }
    finally:
        conn.close()
    return render_page(
        UsagePage(since=since, tenant=tenant, generated_at=datetime.now(UTC), **rows)
    )


def draw_tokens_chart(
    settings: UsageSettings, path: Path, since: date | None = None, tenant: str | None = None
) -> int:
    """Draw tokens per tenant per day to a PNG; return how many tenant series it shows."""
    from consumer.usage.charts import draw_day_bars, every_day, new_figure, top_series

    sql, params = chart_sql(since, tenant)
    conn = connect_catalog(settings)
    try:
        rows = fetch_table(conn, sql, params).to_pylist()
    finally:
        conn.close()
    series = top_series(
        ((r["day"], str(r["tenant_id"]), int(r["tokens"])) for r in rows), CHART_MAX_TENANTS
    )
    figure = new_figure(height=5)
    axes = figure.subplots()
    draw_day_bars(axes, every_day(r["day"] for r in rows), series, "tokens")
    axes.set_title("Tokens (input + output) per tenant per day (UTC)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return len(series)

"""The usage report page: query results in, one self-contained HTML document out.

Charts are matplotlib figures inlined as SVG: the file opens offline, in any browser,
with no script to run or vendor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from html import escape
from typing import Any

from consumer.pipeline.outcome import STACKED_STAGES
from consumer.usage.charts import (
    OK_ERROR_COLOURS,
    draw_category_bars,
    draw_day_bars,
    draw_day_lines,
    every_day,
    figure_svg,
    new_figure,
    top_series,
)

Row = dict[str, Any]
MAX_TENANT_SERIES = 12


@dataclass(frozen=True)
class UsagePage:
    """What the page shows: the rows of `consumer.usage.report.page_queries`, by name."""

    since: date | None
    tenant: str | None
    generated_at: datetime
    tokens: list[Row]  # day, tenant_id, tokens
    operations: list[Row]  # operation, requests, ok, errors, error_pct
    latency: list[Row]  # day, requests, p50_ms, p95_ms
    rejections: list[Row]  # day, tenant_id, rejections
    top_tenants: list[Row]  # tenant, requests, errors, input_tokens, output_tokens, tokens
    # operation, requests, bus_ms … generation_ms (means), total_ms
    stages: list[Row] = field(default_factory=list)


def cell_text(value: Any) -> str:
    """A value as the tables show it: integers with thousands separators, one decimal."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


def _table(table_id: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{escape(cell_text(v))}</td>'
            if isinstance(v, int | float) and not isinstance(v, bool)
            else f"<td>{escape(cell_text(v))}</td>"
            for v in row
        )
        + "</tr>\n"
        for row in rows
    )
    if not rows:
        body = f'<tr><td colspan="{len(headers)}">no rows</td></tr>'
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>'


def _section(
    anchor: str,
    title: str,
    note: str,
    svg: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
) -> str:
    return (
        f'<section id="{anchor}"><h2>{escape(title)}</h2><p class="note">{escape(note)}</p>\n'
        f"<figure>{svg}</figure>\n{_table(f'{anchor}-table', headers, rows)}</section>\n"
    )


def _per_day_by_tenant(
    anchor: str,
    title: str,
    note: str,
    rows: list[Row],
    value: str,
    days: list[date],
    busy_days_only: bool = False,
) -> str:
    """Stacked bars per day by tenant over the page's days; the same numbers as a table."""
    series = top_series(
        ((r["day"], str(r["tenant_id"]), int(r[value])) for r in rows), MAX_TENANT_SERIES
    )
    figure = new_figure()
    draw_day_bars(figure.subplots(), days, series, value, f"no {value} in range")
    table = []
    for day in days:
        cells = [series[name].get(day, 0) for name in series]
        if any(cells) or not busy_days_only:
            table.append([day.isoformat(), *cells, sum(cells)])
    return _section(anchor, title, note, figure_svg(figure), ["day", *series, "total"], table)


def _operations(rows: list[Row]) -> str:
    labels = [str(r["operation"]) for r in rows]
    figure = new_figure(height=max(2.0, 0.5 * len(rows) + 1.2))
    draw_category_bars(
        figure.subplots(),
        labels,
        {"ok": [r["ok"] for r in rows], "error": [r["errors"] for r in rows]},
        "requests",
        OK_ERROR_COLOURS,
    )
    table = [[r["operation"], r["requests"], r["ok"], r["errors"], r["error_pct"]] for r in rows]
    headers = ["operation", "requests", "ok", "errors", "error %"]
    note = (
        "Every consumed request, answered or not; errors include quota rejections and dead letters."
    )
    return _section(
        "operations",
        "Requests and error rate per operation",
        note,
        figure_svg(figure),
        headers,
        table,
    )


def _latency(rows: list[Row]) -> str:
    days = every_day(r["day"] for r in rows)
    by_day = {r["day"]: r for r in rows}
    figure = new_figure()
    draw_day_lines(
        figure.subplots(),
        days,
        {
            key: [by_day[d][f"{key}_ms"] if d in by_day else None for d in days]
            for key in ("p50", "p95")
        },
        "milliseconds",
    )
    table = [[r["day"].isoformat(), r["requests"], r["p50_ms"], r["p95_ms"]] for r in rows]
    note = "total_ms: from the fetch to the reply, over every request of the day."
    return _section(
        "latency",
        "Latency per day (p50, p95)",
        note,
        figure_svg(figure),
        ["day", "requests", "p50 ms", "p95 ms"],
        table,
    )


def _top_tenants(rows: list[Row]) -> str:
    figure = new_figure(height=max(2.0, 0.4 * len(rows) + 1.2))
    draw_category_bars(
        figure.subplots(),
        [str(r["tenant"]) for r in rows],
        {"input": [r["input_tokens"] for r in rows], "output": [r["output_tokens"] for r in rows]},
        "tokens",
    )
    keys = ("tenant", "requests", "errors", "input_tokens", "output_tokens", "tokens")
    table = [[r[k] for k in keys] for r in rows]
    headers = ["tenant", "requests", "errors", "input tokens", "output tokens", "tokens"]
    return _section("top-tenants", "Top tenants by tokens", "", figure_svg(figure), headers, table)


def _stages(rows: list[Row]) -> str:
    """Where the time goes: mean ms per stage, stacked, per operation."""
    labels = [str(r["operation"]) for r in rows]
    figure = new_figure(height=max(2.0, 0.5 * len(rows) + 1.2))
    draw_category_bars(
        figure.subplots(),
        labels,
        {name: [float(r[f"{name}_ms"] or 0) for r in rows] for name in STACKED_STAGES},
        "mean milliseconds",
    )
    headers = ["operation", "requests", *(f"{name} ms" for name in STACKED_STAGES), "total ms"]
    table = [
        [
            r["operation"],
            r["requests"],
            *(r[f"{name}_ms"] for name in STACKED_STAGES),
            r["total_ms"],
        ]
        for r in rows
    ]
    note = (
        "Mean per stage, as reply meta and usage rows name them: bus (Kafka timestamp → fetch), "
        "then admission, slot_wait, prefill and generation, which add up to total "
        "(fetch → reply). Rows written before stages existed, and replays, are left out."
    )
    return _section(
        "stages", "Where the time goes, per operation", note, figure_svg(figure), headers, table
    )


def _summary(page: UsagePage) -> str:
    requests = sum(r["requests"] for r in page.operations)
    errors = sum(r["errors"] for r in page.operations)
    days = [r["day"] for r in page.latency]
    span = f"{min(days).isoformat()} – {max(days).isoformat()}" if days else "no usage"
    facts = [
        ("days (UTC)", span),
        ("requests", cell_text(requests)),
        ("errors", f"{cell_text(errors)} ({100 * errors / requests:.2f} %)" if requests else "0"),
        ("tokens", cell_text(sum(int(r["tokens"]) for r in page.tokens))),
        ("quota rejections", cell_text(sum(int(r["rejections"]) for r in page.rejections))),
    ]
    if page.since is not None:
        facts.append(("since", page.since.isoformat()))
    if page.tenant is not None:
        facts.append(("tenant", page.tenant))
    items = "".join(f"<div><dt>{escape(k)}</dt><dd>{escape(v)}</dd></div>" for k, v in facts)
    return f'<dl id="summary">{items}</dl>\n'


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1050px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
.note, footer { color: #666; } figure { margin: 0.5em 0; } svg { max-width: 100%; height: auto; }
#summary { display: flex; flex-wrap: wrap; gap: 0.5em 2em; }
#summary dt { color: #666; font-size: 0.85em; } #summary dd { margin: 0; font-size: 1.3em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.2em 0.8em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
"""


def render_page(page: UsagePage) -> str:
    """The whole report as one HTML document: no script, no external resource."""
    title = "opstream usage" + (f" — {page.tenant}" if page.tenant else "")
    # Every per-day chart spans the same days: first to last day with any usage.
    days = every_day(r["day"] for rows in (page.latency, page.tokens) for r in rows)
    body = "".join(
        [
            _summary(page),
            _per_day_by_tenant(
                "tokens",
                "Tokens per tenant per day",
                "Input + output tokens; the largest tenants, the rest as (other).",
                page.tokens,
                "tokens",
                days,
            ),
            _operations(page.operations),
            _latency(page.latency),
            _stages(page.stages),
            _per_day_by_tenant(
                "rejections",
                "Quota rejections per day",
                "Requests answered quota_exceeded, per tenant; the table lists days with any.",
                page.rejections,
                "rejections",
                days,
                busy_days_only=True,
            ),
            _top_tenants(page.top_tenants),
        ]
    )
    generated = page.generated_at.isoformat(timespec="seconds")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n"
        f"<body><h1>{escape(title)}</h1>\n{body}"
        f"<footer>Generated {escape(generated)} from the usage catalog (DuckDB).</footer>"
        "</body></html>\n"
    )

"""The usage report page and charts from in-memory rows (no catalog, no files)."""

from __future__ import annotations

from datetime import UTC, date, datetime

from consumer.usage.charts import draw_day_bars, every_day, new_figure, top_series
from consumer.usage.html_report import UsagePage, cell_text, render_page

D1, D2, D4 = date(2025, 6, 1), date(2025, 6, 2), date(2025, 6, 4)


def page(**rows: list[dict[str, object]]) -> UsagePage:
    fields: dict[str, list[dict[str, object]]] = {
        "tokens": [],
        "operations": [],
        "latency": [],
        "rejections": [],
        "top_tenants": [],
    }
    fields.update(rows)
    return UsagePage(
        since=None, tenant=None, generated_at=datetime(2025, 6, 5, tzinfo=UTC), **fields
    )


def test_one_day_of_bars_spans_that_day_only_and_starts_at_zero() -> None:
    axes = new_figure().subplots()
    draw_day_bars(axes, [D1], {"acme": {D1: 1_500}}, "tokens")
    assert axes.get_ylim()[0] == 0 and axes.get_ylim()[1] >= 1_500
    low, high = axes.get_xlim()
    assert -1 < low < 0 < high < 1  # one bar's width, not years of dates around it
    assert [t.get_text() for t in axes.get_xticklabels()] == ["2025-06-01"]


def test_a_long_range_labels_at_most_sixteen_days() -> None:
    days = every_day([date(2025, 1, 1), date(2025, 3, 31)])
    axes = new_figure().subplots()
    draw_day_bars(axes, days, {"acme": dict.fromkeys(days, 10)}, "tokens")
    labels = [t.get_text() for t in axes.get_xticklabels()]
    assert len(days) == 90 and 1 < len(labels) <= 16 and labels[0] == "2025-01-01"
    assert axes.get_xlim()[1] < 90 and axes.get_ylim()[0] == 0


def test_every_day_fills_gaps_between_first_and_last() -> None:
    assert every_day([D4, D1, D4]) == [D1, D2, date(2025, 6, 3), D4]
    assert every_day([]) == []


def test_top_series_keeps_the_largest_and_sums_the_rest_as_other() -> None:
    rows = [(D1, "a", 5), (D1, "b", 50), (D2, "c", 1), (D2, "d", 2), (D2, "b", 1)]
    assert top_series(rows, 2) == {"b": {D1: 50, D2: 1}, "a": {D1: 5}, "(other)": {D2: 3}}


def test_tokens_table_shows_each_day_and_tenant_with_gaps_as_zero() -> None:
    html = render_page(
        page(
            tokens=[
                {"day": D1, "tenant_id": "acme", "tokens": 1_000},
                {"day": D4, "tenant_id": "globex", "tokens": 2_500},
            ]
        )
    )
    table = html[html.index('<table id="tokens-table">') :]
    table = table[: table.index("</table>")]
    assert "<th>day</th><th>globex</th><th>acme</th><th>total</th>" in table
    assert '<td>2025-06-01</td><td class="n">0</td><td class="n">1,000</td>' in table
    assert (
        '<td>2025-06-03</td><td class="n">0</td><td class="n">0</td><td class="n">0</td>' in table
    )
    assert table.count("<tr>") == 5  # header + 06-01 … 06-04


def test_summary_totals_requests_errors_tokens_and_rejections() -> None:
    html = render_page(
        page(
            tokens=[{"day": D1, "tenant_id": "acme", "tokens": 1_234}],
            operations=[
                {"operation": "chat", "requests": 8, "ok": 6, "errors": 2, "error_pct": 25.0}
            ],
            latency=[{"day": D1, "requests": 8, "p50_ms": 10.0, "p95_ms": 20.0}],
            rejections=[{"day": D1, "tenant_id": "acme", "rejections": 2}],
        )
    )
    summary = html[html.index('<dl id="summary">') : html.index("</dl>")]
    assert "<dd>2025-06-01 – 2025-06-01</dd>" in summary
    assert "<dd>8</dd>" in summary and "<dd>2 (25.00 %)</dd>" in summary
    assert "<dd>1,234</dd>" in summary


def test_an_empty_range_still_renders_every_section() -> None:
    html = render_page(page())
    assert html.count("<svg") == 6 and html.count(">no rows</td>") == 6
    assert "no usage" in html


def test_names_from_the_data_are_escaped() -> None:
    evil = "<script>alert(1)</script>"
    html = render_page(
        page(
            top_tenants=[
                {
                    "tenant": evil,
                    "requests": 1,
                    "errors": 0,
                    "input_tokens": 1,
                    "output_tokens": 1,
                    "tokens": 2,
                }
            ]
        )
    )
    assert "<script" not in html and "&lt;script&gt;" in html


def test_cells_use_thousands_separators_and_one_decimal() -> None:
    assert [cell_text(v) for v in (1_234_567, 12.345, None, "x")] == ["1,234,567", "12.3", "", "x"]


def test_where_the_time_goes_stacks_the_stages_per_operation() -> None:
    stages = {"bus_ms": 1.5, "admission_ms": 2.0, "slot_wait_ms": 730.0}
    stages |= {"prefill_ms": 40.0, "generation_ms": 200.0, "total_ms": 972.5}
    html = render_page(page(stages=[{"operation": "chat", "requests": 5, **stages}]))
    section = html[html.index('<section id="stages">') :]
    section = section[: section.index("</section>")]
    for header in ("bus ms", "admission ms", "slot_wait ms", "prefill ms", "generation ms"):
        assert f"<th>{header}</th>" in section
    assert ">730<" in section or ">730.0<" in section
    assert section.count("<svg") == 1

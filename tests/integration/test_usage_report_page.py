"""`opstream usage report --html`: the page's numbers against DuckDB, and the page in Chromium."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import duckdb
import pytest
from usage_writer_loop import make_row

from consumer.cli.usage import register
from consumer.usage import UsageSettings, catalog_path, write_rows

DAY = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)
TENANTS = ("acme", "globex", "initech")
CHROMIUM = shutil.which("chromium")


def run(argv: list[str], root: Path) -> int:
    parser = argparse.ArgumentParser(prog="opstream")
    register(
        parser.add_subparsers(dest="command", required=True),
        argparse.ArgumentParser(add_help=False),
    )
    args = parser.parse_args(argv)
    result: int = args.func(args, SimpleNamespace(usage=UsageSettings(directory=root)))
    return result


@pytest.fixture(scope="module")
def usage_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four days with a gap on 06-03, three tenants, two operations, quota rejections, a DLQ row."""
    root = tmp_path_factory.mktemp("usage")
    rows = []
    for d in (0, 1, 3, 4):
        for t, tenant in enumerate(TENANTS):
            for i in range(2 + t + d):
                rows.append(
                    make_row(
                        f"{tenant}-{d}-{i}",
                        tenant_id=tenant,
                        finished_at=DAY + timedelta(days=d, minutes=i),
                        operation="translate" if i % 3 else "summarize",
                        output_tokens=10 * (t + 1) + i,
                        total_ms=80.0 + 13 * i + 7 * d,
                    )
                )
        rows.append(
            make_row(
                f"q-{d}",
                tenant_id="globex" if d % 2 else "acme",
                status="error",
                error_code="quota_exceeded",
                finished_at=DAY + timedelta(days=d, hours=1),
                input_tokens=None,
                output_tokens=None,
                total_ms=2.0,
            )
        )
    rows.append(
        make_row(
            None,
            tenant_id=None,
            operation=None,
            status="error",
            error_code="dlq",
            finished_at=DAY,
            input_tokens=None,
            output_tokens=None,
        )
    )
    write_rows(root, "a", rows)
    return root


class _Tables(HTMLParser):
    """Each `<table id=…>` of a page as rows of cell text (header row first)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = self.tables.setdefault(str(dict(attrs).get("id")), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None and self._table is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def tables_of(page: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def query(root: Path, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    conn = duckdb.connect(str(catalog_path(UsageSettings(directory=root))), read_only=True)
    try:
        return conn.execute(sql, params or []).fetchall()
    finally:
        conn.close()


def assert_page_matches_duckdb(page: str, root: Path) -> None:
    """Every number in the page's tables equals the same figure computed straight from `usage`."""
    tables = tables_of(page)

    tokens = {
        (day.isoformat(), tenant): int(n)
        for day, tenant, n in query(
            root,
            "SELECT date, tenant_id, sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0)) "
            "FROM usage WHERE tenant_id IS NOT NULL GROUP BY ALL",
        )
    }
    header, *rows = tables["tokens-table"]
    assert header == [
        "day",
        *sorted(TENANTS, key=lambda t: -sum(v for (_, n), v in tokens.items() if n == t)),
        "total",
    ]
    assert [r[0] for r in rows] == [
        "2025-06-01",
        "2025-06-02",
        "2025-06-03",
        "2025-06-04",
        "2025-06-05",
    ]
    for row in rows:
        per_tenant = [tokens.get((row[0], t), 0) for t in header[1:-1]]
        assert [number(c) for c in row[1:]] == [*per_tenant, sum(per_tenant)]
    assert rows[2][1:] == ["0", "0", "0", "0"]  # the gap day is shown, as zero

    expected_operations = query(
        root,
        "SELECT coalesce(operation, '(none)'), count(*), count(*) FILTER (WHERE status = 'ok'), "
        "count(*) FILTER (WHERE status = 'error') FROM usage GROUP BY 1 ORDER BY 2 DESC, 1",
    )
    operations = tables["operations-table"][1:]
    assert [(r[0], *map(number, r[1:4])) for r in operations] == expected_operations
    for r in operations:
        assert number(r[4]) == pytest.approx(100 * number(r[3]) / number(r[1]), abs=0.051)

    expected_latency = query(
        root,
        "SELECT date, count(*), quantile_cont(total_ms, 0.5), quantile_cont(total_ms, 0.95) "
        "FROM usage GROUP BY 1 ORDER BY 1",
    )
    latency = tables["latency-table"][1:]
    assert len(latency) == len(expected_latency) == 4
    for row, (day, requests, p50, p95) in zip(latency, expected_latency, strict=True):
        assert row[0] == day.isoformat() and number(row[1]) == requests
        assert number(row[2]) == pytest.approx(p50, abs=0.051)
        assert number(row[3]) == pytest.approx(p95, abs=0.051)

    rejections = dict(
        query(
            root,
            "SELECT strftime(date, '%Y-%m-%d') || '/' || tenant_id, count(*) FROM usage "
            "WHERE error_code = 'quota_exceeded' GROUP BY 1",
        )
    )
    header, *rows = tables["rejections-table"]
    shown = {
        f"{row[0]}/{tenant}": number(cell)
        for row in rows
        for tenant, cell in zip(header[1:-1], row[1:-1], strict=True)
        if number(cell)
    }
    assert shown == rejections and sum(rejections.values()) == 4

    expected_top = query(
        root,
        "SELECT tenant_id, count(*), count(*) FILTER (WHERE status = 'error'), "
        "sum(coalesce(input_tokens, 0)), sum(coalesce(output_tokens, 0)) "
        "FROM usage WHERE tenant_id IS NOT NULL GROUP BY 1",
    )
    top = tables["top-tenants-table"][1:]
    assert sorted((r[0], *map(number, r[1:5])) for r in top) == sorted(expected_top)
    assert [number(r[5]) for r in top] == sorted(
        (number(r[3]) + number(r[4]) for r in top), reverse=True
    )


@pytest.fixture(scope="module")
def page_path(usage_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("page") / "report.html"
    assert run(["usage", "report", "--html", str(path)], usage_root) == 0
    return path


def test_report_page_numbers_match_duckdb(page_path: Path, usage_root: Path) -> None:
    assert_page_matches_duckdb(page_path.read_text(encoding="utf-8"), usage_root)


def test_report_page_loads_nothing_from_elsewhere(page_path: Path) -> None:
    page = page_path.read_text(encoding="utf-8")
    assert page.count("<svg") == 6  # one inline chart per section
    assert "<script" not in page and "<link" not in page and " src=" not in page
    assert re.findall(r'url\((?!#)|href="(?!#)', page) == []  # only the SVGs' own #ids


def test_report_page_filters_by_tenant_and_since(usage_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "globex.html"
    argv = ["usage", "report", "--html", str(path), "--tenant", "globex", "--since", "2025-06-02"]
    assert run(argv, usage_root) == 0
    tables = tables_of(path.read_text(encoding="utf-8"))
    assert tables["tokens-table"][0] == ["day", "globex", "total"]
    assert [r[0] for r in tables["tokens-table"][1:]] == [
        "2025-06-02",
        "2025-06-03",
        "2025-06-04",
        "2025-06-05",
    ]
    assert [r[0] for r in tables["top-tenants-table"][1:]] == ["globex"]


def test_chart_of_a_single_day_is_written(usage_root: Path, tmp_path: Path) -> None:
    chart = tmp_path / "one-day.png"
    argv = ["usage", "report", "--chart", str(chart), "--since", "2025-06-05"]
    assert run(argv, usage_root) == 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on the page, offline: no sync, no updates, no background requests."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *extra,
        page.absolute().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(
    CHROMIUM is None, reason="no `chromium` binary on PATH (apt-get install chromium)"
)
def test_report_page_renders_in_headless_chromium(
    page_path: Path, usage_root: Path, tmp_path: Path
) -> None:
    from matplotlib.image import imread

    screenshot = tmp_path / "page.png"
    shot = chromium(
        page_path, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1200,2000"
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    console = [
        line for line in shot.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line
    ]
    assert console == [], console

    pixels = imread(screenshot)[:, :, :3]
    assert pixels.shape[:2] == (2000, 1200)
    colours = {tuple(p) for p in (pixels.reshape(-1, 3) * 255).round().astype(int)[::7].tolist()}
    assert len(colours) > 50, f"only {len(colours)} colours: a blank page?"
    not_white = (pixels < 0.95).any(axis=2).mean()
    assert not_white > 0.05, f"{not_white:.1%} of the screenshot is not white"

    dom = chromium(page_path, tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert_page_matches_duckdb(dom.stdout, usage_root)  # what the browser parsed, not our text

"""`opstream usage report|query|compact|catalog` end to end on real files."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from usage_writer_loop import make_row

from consumer.cli.usage import register
from consumer.usage import UsageSettings, write_rows

DAY = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)


def run(argv: list[str], root: Path) -> int:
    parser = argparse.ArgumentParser(prog="opstream")
    common = argparse.ArgumentParser(add_help=False)
    register(parser.add_subparsers(dest="command", required=True), common)
    args = parser.parse_args(argv)
    settings: Any = SimpleNamespace(usage=UsageSettings(directory=root))
    result: int = args.func(args, settings)
    return result


@pytest.fixture
def usage_root(tmp_path: Path) -> Path:
    rows = []
    for d in range(3):
        for t, tenant in enumerate(("acme", "globex")):
            for i in range(5 + t):
                rows.append(
                    make_row(
                        f"{tenant}-{d}-{i}",
                        tenant_id=tenant,
                        finished_at=DAY + timedelta(days=d, minutes=i),
                        operation="translate" if i % 2 else "summarize",
                    )
                )
    rows.append(make_row("q", tenant_id="acme", status="error", error_code="quota_exceeded"))
    write_rows(tmp_path, "a", rows)
    return tmp_path


def test_report_by_tenant_prints_one_line_per_tenant(
    usage_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["usage", "report", "--by", "tenant", "--since", "2025-06-02"], usage_root) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["tenant", "requests", "ok", "errors"]
    assert lines[2].split()[:4] == ["acme", "11", "10", "1"]  # 2 days x 5 + the quota error
    assert lines[3].split()[:4] == ["globex", "12", "12", "0"]
    assert lines[-1] == "(2 rows)"


def test_report_filters_by_tenant_and_groups_by_day(
    usage_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["usage", "report", "--tenant", "globex"], usage_root) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:-1]] == ["2025-06-01", "2025-06-02", "2025-06-03"]


def test_report_chart_writes_a_png(
    usage_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    chart = tmp_path_factory.mktemp("charts") / "tokens.png"
    assert run(["usage", "report", "--chart", str(chart)], usage_root) == 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_query_runs_sql_against_the_views(
    usage_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sql = "SELECT tenant_id, sum(requests) AS n FROM daily_tenant_usage GROUP BY 1 ORDER BY 1"
    assert run(["usage", "query", "--format", "csv", sql], usage_root) == 0
    assert capsys.readouterr().out.splitlines() == ["tenant_id,n", "acme,16", "globex,18"]


def test_query_prints_timestamps_without_extra_modules(
    usage_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["usage", "query", "SELECT min(received_at) AS t FROM usage"], usage_root) == 0
    assert "2025-06-01 08:59:59.88" in capsys.readouterr().out


def test_query_is_read_only(usage_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["usage", "query", "DROP VIEW usage"], usage_root) == 1
    assert "read-only" in capsys.readouterr().err
    assert run(["usage", "query", "SELECT count(*) FROM usage"], usage_root) == 0


def test_bad_sql_is_reported_not_raised(
    usage_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["usage", "query", "SELEKT 1"], usage_root) == 1
    assert "syntax error" in capsys.readouterr().err.lower()


def test_compact_and_catalog_commands(usage_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["usage", "catalog"], usage_root) == 0
    assert capsys.readouterr().out.strip() == str(usage_root / "usage.duckdb")
    write_rows(usage_root, "a", [make_row("extra", finished_at=DAY + timedelta(minutes=30))])
    assert run(["usage", "compact", "--after-s", "0"], usage_root) == 0
    assert capsys.readouterr().out.startswith("compacted 1 folder(s): 2 segments")


def test_readme_example_queries_run(usage_root: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Useful queries", 1)[1]
    block = section.split("```sql", 1)[1].split("```", 1)[0]
    queries = [q.strip() for q in block.split(";") if q.strip()]
    assert len(queries) == 6
    for sql in queries:
        assert run(["usage", "query", "--format", "csv", sql], usage_root) == 0, sql

"""Report SQL and text formatting for `opstream usage` (no files touched)."""

from __future__ import annotations

import argparse
from datetime import date
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from consumer.cli.usage import format_result, register
from consumer.settings.usage import UsageSettings
from consumer.usage.report import chart_sql, format_csv, report_sql


def test_report_sql_groups_by_the_requested_key_and_binds_filters() -> None:
    sql, params = report_sql("tenant", date(2025, 1, 2), "acme")
    assert sql.startswith("SELECT tenant_id AS tenant,")
    assert "date >= ?" in sql and "tenant_id = ?" in sql
    assert params == [date(2025, 1, 2), "acme"]
    assert "acme" not in sql  # values are bound, never spliced


def test_report_sql_without_filters_has_no_where() -> None:
    sql, params = report_sql("day", None, None)
    assert "FROM usage GROUP BY" in sql and params == []
    assert "usage_raw" not in sql  # the de-duplicated view


def test_chart_sql_sums_tokens_per_tenant_and_day() -> None:
    sql, params = chart_sql(None, "acme")
    assert "GROUP BY ALL" in sql and params == ["acme"]


def test_table_right_aligns_numbers_and_counts_rows() -> None:
    table = pa.table(
        {
            "tenant": ["acme", None],
            "requests": [1234, 5],
            "tokens": pa.array([Decimal(10), Decimal(2_000_000)], pa.decimal128(38, 0)),
            "p50_ms": [1.25, None],
        }
    )
    lines = format_result(table).splitlines()
    assert lines[0].split() == ["tenant", "requests", "tokens", "p50_ms"]
    assert lines[2].startswith("acme")
    assert lines[2].split()[1:] == ["1,234", "10", "1.2"]
    assert lines[3].split() == ["5", "2,000,000"]
    assert len(lines[2]) >= len(lines[0]) - len("p50_ms") + len("1.2")
    assert lines[-1] == "(2 rows)"


def test_csv_has_header_and_empty_nulls() -> None:
    text = format_csv(pa.table({"a": [1, None], "b": ["x", "y,z"]}))
    assert text.splitlines() == ["a,b", "1,x", ',"y,z"']


def test_settings_defaults_and_bounds() -> None:
    settings = UsageSettings()
    assert settings.flush_rows == 5_000 and settings.flush_age_s == 5.0
    assert settings.compact_interval_s == 0 and settings.enabled
    assert str(settings.directory) == "usage"
    with pytest.raises(ValidationError):
        UsageSettings(flush_rows=0)
    with pytest.raises(ValidationError):
        UsageSettings(flush_age_s=0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opstream")
    subparsers = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None)
    register(subparsers, common)
    return parser


def test_cli_parses_report_options() -> None:
    args = _parser().parse_args(
        ["usage", "report", "--since", "2025-01-02", "--tenant", "acme", "--by", "operation"]
    )
    assert args.since == date(2025, 1, 2) and args.tenant == "acme" and args.by == "operation"
    assert args.func.__name__ == "cmd_report" and args.chart is None


def test_cli_dir_option_becomes_a_settings_override() -> None:
    args = _parser().parse_args(["usage", "query", "--dir", "/data/usage", "SELECT 1"])
    overrides: dict[str, object] = {}
    for extra in args.settings_overrides:
        extra(args, overrides)
    assert overrides == {"usage": {"directory": Path("/data/usage")}}
    assert args.sql == "SELECT 1"


@pytest.mark.parametrize("subcommand", ["compact", "catalog"])
def test_cli_has_maintenance_subcommands(subcommand: str) -> None:
    args = _parser().parse_args(["usage", subcommand, "--config", "x.toml"])
    assert args.func.__name__ == f"cmd_{subcommand}" and args.config == "x.toml"


def test_cli_rejects_unknown_grouping() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["usage", "report", "--by", "model"])

"""The CLI's one table printer: header, rule, padded columns, chosen columns right-aligned."""

from __future__ import annotations

from consumer.cli.table import format_table


def test_columns_are_as_wide_as_their_widest_cell_and_two_spaces_apart() -> None:
    lines = format_table(["TENANT", "N"], [["acme", 5], ["globex-long", 12]]).splitlines()
    assert lines == [
        "TENANT       N",
        "-----------  --",
        "acme         5",
        "globex-long  12",
    ]


def test_right_aligned_columns_pad_on_the_left() -> None:
    lines = format_table(["NAME", "COUNT"], [["a", 7], ["b", 1234]], right={1}).splitlines()
    assert lines[2:] == ["a         7", "b      1234"]


def test_an_empty_table_still_has_its_header_and_rule() -> None:
    assert format_table(["A", "BB"], []).splitlines() == ["A  BB", "-  --"]

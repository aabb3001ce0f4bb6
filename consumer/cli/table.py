"""The CLI's one table shape: a header line, a rule, then one fixed-width line per row."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence


def format_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Collection[int] = ()
) -> str:
    """Columns padded to their widest cell, two spaces apart; columns in `right` right-aligned."""
    cells = [[str(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            value.rjust(width) if i in right else value.ljust(width)
            for i, (value, width) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def print_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Collection[int] = ()
) -> None:
    """Print `format_table(headers, rows, right=right)` to stdout."""
    print(format_table(headers, rows, right=right))

"""Usage charts drawn with matplotlib: bars per day from zero, and their SVG or PNG text."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, timedelta
from typing import TYPE_CHECKING

# matplotlib loads when a chart is drawn (`opstream usage report --chart/--html`), never for
# `opstream --help`.
if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

OTHER = "(other)"
MAX_DAY_LABELS = 16
OK_ERROR_COLOURS = ("#4c78a8", "#e45756")


def every_day(days: Iterable[date]) -> list[date]:
    """Each day from the first to the last of `days`, gaps included (the x axis)."""
    present = sorted(set(days))
    if not present:
        return []
    span = (present[-1] - present[0]).days
    return [present[0] + timedelta(days=i) for i in range(span + 1)]


def top_series(rows: Iterable[tuple[date, str, int]], limit: int) -> dict[str, dict[date, int]]:
    """Per name, its value per day: the `limit` largest names, the rest summed as `(other)`."""
    series: dict[str, dict[date, int]] = {}
    for day, name, value in rows:
        per_day = series.setdefault(name, {})
        per_day[day] = per_day.get(day, 0) + value
    ranked = sorted(series, key=lambda name: (-sum(series[name].values()), name))
    shown = {name: series[name] for name in ranked[:limit]}
    if len(ranked) > limit:
        other: dict[date, int] = {}
        for name in ranked[limit:]:
            for day, value in series[name].items():
                other[day] = other.get(day, 0) + value
        shown[OTHER] = other
    return shown


def new_figure(height: float = 4.0) -> Figure:
    """A figure of the page's width, with no pyplot state behind it."""
    from matplotlib.figure import Figure

    return Figure(figsize=(10, height), dpi=100, layout="constrained")


def _day_axis(axes: Axes, days: Sequence[date]) -> None:
    # Categorical positions: the axis spans exactly the data's days, one day included,
    # instead of matplotlib's date autoscaling (years around a single point).
    step = max(1, math.ceil(len(days) / MAX_DAY_LABELS))
    positions = list(range(0, len(days), step))
    axes.set_xticks(positions, [days[i].isoformat() for i in positions])
    axes.set_xlim(-0.6, len(days) - 0.4)
    axes.tick_params(axis="x", labelrotation=30 if len(positions) > 4 else 0)
    axes.set_xlabel("day (UTC)")


def _from_zero(axes: Axes, axis: str = "y") -> None:
    # Counts and durations start at zero; an all-zero chart still gets a visible axis.
    if axis == "y":
        axes.set_ylim(0, max(axes.get_ylim()[1], 1))
    else:
        axes.set_xlim(0, max(axes.get_xlim()[1], 1))


def _legend(axes: Axes, reverse: bool = False) -> None:
    # Beside the plot, never over a bar; a stack's legend reads top to bottom like the stack.
    handles, labels = axes.get_legend_handles_labels()
    if reverse:
        handles, labels = handles[::-1], labels[::-1]
    axes.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")


def _empty(axes: Axes, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes)
    axes.set_xticks([])
    axes.set_yticks([])


def draw_day_bars(
    axes: Axes,
    days: Sequence[date],
    series: Mapping[str, Mapping[date, int]],
    ylabel: str,
    empty: str = "no usage in range",
) -> None:
    """Stacked bars per day, one colour per series, y from zero."""
    if not days or not series:
        _empty(axes, empty)
        return
    positions = range(len(days))
    bottom = [0] * len(days)
    for index, (name, per_day) in enumerate(series.items()):
        heights = [per_day.get(day, 0) for day in days]
        axes.bar(positions, heights, bottom=bottom, label=name, color=f"C{index % 10}")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    _day_axis(axes, days)
    axes.set_ylabel(ylabel)
    _from_zero(axes)
    _legend(axes, reverse=True)


def draw_day_lines(
    axes: Axes, days: Sequence[date], series: Mapping[str, Sequence[float | None]], ylabel: str
) -> None:
    """One line per series over the days (a value per day, None for no data), y from zero."""
    if not days:
        _empty(axes, "no usage in range")
        return
    for index, (name, values) in enumerate(series.items()):
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        axes.plot(
            [i for i, _ in points],
            [v for _, v in points],
            marker="o",
            label=name,
            color=f"C{index}",
        )
    _day_axis(axes, days)
    axes.set_ylabel(ylabel)
    _from_zero(axes)
    _legend(axes)


def draw_category_bars(
    axes: Axes,
    labels: Sequence[str],
    parts: Mapping[str, Sequence[float]],
    xlabel: str,
    colours: Sequence[str] = (),
) -> None:
    """Horizontal bars per label, `parts` stacked, x from zero; the first label on top."""
    if not labels:
        _empty(axes, "no usage in range")
        return
    positions = range(len(labels))
    left: list[float] = [0.0] * len(labels)
    for index, (name, widths) in enumerate(parts.items()):
        colour = colours[index] if index < len(colours) else f"C{index % 10}"
        axes.barh(positions, widths, left=left, label=name, color=colour)
        left = [a + w for a, w in zip(left, widths, strict=True)]
    axes.set_yticks(positions, labels)
    axes.invert_yaxis()
    axes.set_xlabel(xlabel)
    _from_zero(axes, "x")
    _legend(axes)


def figure_svg(figure: Figure) -> str:
    """The figure as an `<svg>` element to inline in HTML (text kept as text, no timestamp)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "opstream"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]

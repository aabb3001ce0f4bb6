"""Progress of a batch: pure formatting (`format_bar`, `format_line`) and a printer."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class Progress:
    """Where a run stands. `ok`/`failed` count the whole output (earlier runs included),
    `done_this_run` only this run's results (the rate is of those)."""

    total: int
    ok: int
    failed: int
    previous: int
    done_this_run: int
    in_flight: int
    elapsed_s: float
    finished: bool = False

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def rate(self) -> float:
        """Results per second in this run."""
        return self.done_this_run / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        left = self.total - self.done
        if left <= 0:
            return 0.0
        return left / self.rate if self.rate > 0 else None


def format_duration(seconds: float | None) -> str:
    """`59 s`, `4 min 10 s`, `2 h 05 min`; `?` when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _counts(p: Progress) -> str:
    return (
        f"{p.done}/{p.total} ok {p.ok} failed {p.failed} · {p.rate:.1f} req/s"
        f" · ETA {format_duration(p.eta_s)}"
    )


def format_bar(p: Progress, width: int = 80) -> str:
    """One terminal line: `[#####.....] 512/1000 ok 500 failed 12 · 8.3 req/s · ETA 59 s`,
    the bar shrunk (or dropped) so that the line fits in `width` columns."""
    text = _counts(p) if not p.finished else _counts(p).rsplit(" · ETA", 1)[0]
    fraction = p.done / p.total if p.total else 1.0
    cells = min(30, width - len(text) - 3)
    if cells < 5:
        return text[: max(width, 1)]
    filled = min(cells, int(fraction * cells))
    return f"[{'#' * filled}{'.' * (cells - filled)}] {text}"


def format_line(p: Progress) -> str:
    """One progress line for a log: counts, percent, rate, ETA and elapsed time."""
    percent = 100.0 * p.done / p.total if p.total else 100.0
    return (
        f"batch: {p.done}/{p.total} ({percent:.0f}%) ok {p.ok} failed {p.failed}"
        f" · {p.rate:.1f} req/s · ETA {format_duration(p.eta_s)}"
        f" · elapsed {format_duration(p.elapsed_s)}"
    )


class ProgressPrinter:
    """Draws progress on `stream` (stderr): a bar redrawn in place on a terminal (at most
    every `redraw_s`), otherwise a plain line every `every_s` seconds or `every_percent`
    percent, and always a last one. `message()` prints a line without garbling the bar."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        width: int | None = None,
        redraw_s: float = 0.1,
        every_s: float = 10.0,
        every_percent: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._width = width
        self._redraw_s = redraw_s
        self._every_s = every_s
        self._every_percent = every_percent
        self._clock = clock
        self._last_at: float | None = None
        self._last_percent = 0.0
        self._last_done = -1
        self._drawn = False
        self._last: Progress | None = None

    def width(self) -> int:
        if self._width is not None:
            return self._width
        import shutil

        return shutil.get_terminal_size((80, 24)).columns

    def __call__(self, p: Progress) -> None:
        self._last = p
        now = self._clock()
        if self.tty:
            if p.finished or self._last_at is None or now - self._last_at >= self._redraw_s:
                self._draw(p)
                self._last_at = now
                if p.finished:
                    self.stream.write("\n")
                    self._drawn = False
                self.stream.flush()
            return
        percent = 100.0 * p.done / p.total if p.total else 100.0
        due = (
            (p.finished and p.done != self._last_done)
            or self._last_at is None
            or now - self._last_at >= self._every_s
            or percent - self._last_percent >= self._every_percent
        )
        if due:
            self.stream.write(format_line(p) + "\n")
            self.stream.flush()
            self._last_at = now
            self._last_percent = percent
            self._last_done = p.done

    def _draw(self, p: Progress) -> None:
        width = self.width()
        self.stream.write("\r" + format_bar(p, width - 1) + "\x1b[K")
        self._drawn = True

    def message(self, text: str) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K" + text + "\n")
            if self._last is not None:
                self._draw(self._last)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

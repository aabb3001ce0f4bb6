"""What the engine's info says for the gauges: scheduler load and counters, GPU memory, read
once per metrics collection."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from opentelemetry.metrics import Observation

from consumer.engine.base import EngineInfo

# The engine's info (None before an engine exists); GPU memory is read from its details.
EngineInfoSource = Callable[[], EngineInfo | None]


class EngineReading:
    """The engine's info for the gauges, read at most once per collection.

    Reading `engine.info` is not free (exllamav2 queries each GPU's memory), and one scrape
    observes every scheduler and GPU series: inside `collection()` the first gauge reads it
    and the others reuse that reading; outside one (a reader collecting on its own), each
    reads afresh.
    """

    _UNREAD = object()

    def __init__(self) -> None:
        self.source: EngineInfoSource | None = None
        self._depth = 0
        self._reading: object = self._UNREAD

    @contextmanager
    def collection(self) -> Iterator[None]:
        """One metrics collection: the engine is read once, on first use, within it."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._reading = self._UNREAD

    def info(self) -> EngineInfo | None:
        """The engine's info as of this collection (None before an engine exists)."""
        if self.source is None:
            return None
        if self._depth == 0:
            return self.source()
        if self._reading is self._UNREAD:
            self._reading = self.source()
        return self._reading  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class SchedulerState:
    """The scheduler's load as the engine reports it in `details["scheduler"]`."""

    slots: int
    running: int
    queued_requests: dict[str, int]
    queued_tokens: dict[str, int]
    counts: dict[str, int]  # the scheduler's monotonic counters (`SCHEDULER_COUNTERS`)


def scheduler_state(info: EngineInfo | None) -> SchedulerState | None:
    """The engine's scheduler load, or None before an engine exists (or one without it)."""
    state = info.details.get("scheduler") if info is not None else None
    if not isinstance(state, dict):
        return None
    return SchedulerState(
        slots=int(state.get("slots", 0)),
        running=int(state.get("running", 0)),
        queued_requests=dict(state.get("queued_requests", {})),
        queued_tokens=dict(state.get("queued_tokens", {})),
        counts={name: int(state.get(name) or 0) for name, _, _ in SCHEDULER_COUNTERS},
    )


def _per_priority(counts: dict[str, int]) -> list[Observation]:
    return [Observation(n, {"priority": p}) for p, n in counts.items()]


# (name, unit, description, what to observe) of each scheduler gauge.
SCHEDULER_GAUGES: tuple[
    tuple[str, str, str, Callable[[SchedulerState], list[Observation]]], ...
] = (
    (
        "queued_requests",
        "{request}",
        "Requests admitted to the engine's scheduler and waiting for a slot.",
        lambda s: _per_priority(s.queued_requests),
    ),
    (
        "queued_tokens",
        "{token}",
        "Prompt + remaining output tokens of the queued requests.",
        lambda s: _per_priority(s.queued_tokens),
    ),
    (
        "running",
        "{sequence}",
        "Sequences in the running batch.",
        lambda s: [Observation(s.running)],
    ),
    (
        "slots",
        "{sequence}",
        "Sequences the engine can run at once.",
        lambda s: [Observation(s.slots)],
    ),
    (
        "slot_occupancy",
        "1",
        "Running sequences over slots (0 to 1).",
        lambda s: [Observation(s.running / s.slots)] if s.slots else [],
    ),
)


# (name, unit, description) of each counter the scheduler keeps (engine details["scheduler"]).
SCHEDULER_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("preemptions", "{request}", "Running work paused for other work (it resumes later)."),
    ("reprefill_tokens", "{token}", "Tokens prefilled again when paused work resumed."),
    ("refused_starts", "{request}", "Starts the backend refused (requeued, never answered)."),
    (
        "disagreements",
        "{request}",
        "Running work the backend no longer advanced (answered retryable).",
    ),
    ("stalls", "{stall}", "Times open work made no progress for engine.scheduler.stall_after_s."),
)


@dataclass(frozen=True, slots=True)
class GpuMemory:
    """One device's memory as the engine reports it."""

    index: int
    name: str
    used_bytes: int
    total_bytes: int

    @property
    def labels(self) -> dict[str, str]:
        return {"gpu": str(self.index), "name": self.name}


def gpu_memory(info: EngineInfo | None) -> list[GpuMemory]:
    """The devices in the engine's `details["gpus"]` (exllamav2 reports them), else none.

    No engine, a CPU engine or an engine that lost its GPU reports no device; an entry
    without integer byte counts is skipped rather than failing the scrape.
    """
    gpus = info.details.get("gpus") if info is not None else None
    if not isinstance(gpus, list):
        return []
    return [
        GpuMemory(
            index=gpu["index"] if isinstance(gpu.get("index"), int) else position,
            name=str(gpu.get("name", "")),
            used_bytes=gpu["memory_used_bytes"],
            total_bytes=gpu["memory_total_bytes"],
        )
        for position, gpu in enumerate(gpus)
        if isinstance(gpu, dict)
        and isinstance(gpu.get("memory_used_bytes"), int)
        and isinstance(gpu.get("memory_total_bytes"), int)
    ]


GRAMMAR_CACHE_RESULTS = ("hit", "miss", "refused")


def grammar_cache_counts(info: EngineInfo | None) -> dict[str, int]:
    """The engine's compiled-grammar cache lookups by result (`details["grammar_cache"]`);
    empty before the first constrained request builds the cache."""
    cache = info.details.get("grammar_cache") if info is not None else None
    if not isinstance(cache, dict):
        return {}
    return {
        "hit": int(cache.get("hits") or 0),
        "miss": int(cache.get("misses") or 0),
        "refused": int(cache.get("refused") or 0),
    }

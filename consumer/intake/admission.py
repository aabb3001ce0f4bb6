"""How much work the engine may hold so that a revoked partition drains within the grace."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from consumer.engine.base import (
    BatchObserver,
    ChatMessage,
    Engine,
    EngineInfo,
    EngineOverloaded,
    Generation,
    GenerationRequest,
    Scores,
    WorkCancelled,
    WorkExpired,
    WorkTag,
)
from consumer.engine.scheduler.policy import Load

# Work the engine holds must finish within this share of `intake.shutdown_grace_s`; the
# rest is for what a drain does after the engine (replies, usage rows, commits, quota state),
# for requests that were on their way to the engine when the revocation came, and for the
# estimate being wrong (measured: drains took up to 1.25x the estimate under test load).
DRAIN_SHARE = 1 / 2
# A new throughput sample weighs this much against the estimate so far.
SAMPLE_WEIGHT = 0.3


@dataclass(slots=True)
class DrainBudget:
    """The most requests the engine may hold (running + queued) so that all of them finish
    within `drain_s`, from the throughput measured while it was busy (pure).

    Until the first sample it admits `slots` (what runs at once) and says it is not
    `measured`: more work waits for the estimate rather than being refused on a guess.
    """

    slots: int
    capacity: int  # what the scheduler holds: its slots + its queue
    drain_s: float
    rate: float | None = None  # requests finished per busy second; None until measured
    _window_busy_s: float = field(default=0.0, repr=False)
    _window_done: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.slots < 1 or self.capacity < self.slots or self.drain_s < 0:
            raise ValueError("need slots >= 1, capacity >= slots and drain_s >= 0")

    @property
    def measured(self) -> bool:
        return self.rate is not None

    @property
    def limit(self) -> int:
        """Requests the engine may hold now: what finishes within `drain_s` at the measured
        rate, at least `slots` (running work has to finish anyway), at most `capacity`."""
        if self.rate is None or self.drain_s <= 0:
            return self.slots
        fits = self.rate * self.drain_s
        if fits >= self.capacity:  # also an unbounded rate (a round that took no time)
            return self.capacity
        return max(self.slots, math.floor(fits))

    def observe(self, busy_s: float, finished: int) -> None:
        """`busy_s` seconds passed with work in the engine, and `finished` requests ended.

        A sample is taken once `slots` requests finished (one round of every slot), so a
        batch that ends together is not read as an infinite rate.
        """
        if busy_s < 0 or finished < 0:
            raise ValueError("busy time and finished count must not be negative")
        self._window_busy_s += busy_s
        self._window_done += finished
        if self._window_done < self.slots or self._window_busy_s <= 0:
            return
        sample = self._window_done / self._window_busy_s
        if self.rate is None:
            self.rate = sample
        else:
            self.rate = (1 - SAMPLE_WEIGHT) * self.rate + SAMPLE_WEIGHT * sample
        self._window_busy_s = 0.0
        self._window_done = 0


def drain_budget(load: Load, grace_s: float) -> DrainBudget:
    """The budget for an engine with this load's slots and queue and this shutdown grace."""
    slots = max(1, load.slots)
    return DrainBudget(
        slots=slots,
        capacity=max(slots, load.slots + load.queue_limit),
        drain_s=grace_s * DRAIN_SHARE,
    )


class DrainBoundEngine:
    """The engine, refusing (`EngineOverloaded`, answered `overloaded` and not charged) work
    beyond what it can finish within the drain time, so a revoked partition drains.

    Everything else is the wrapped engine's. Kafka's own back-pressure (the intake's
    in-flight bound) still stops the fetch when the scheduler's queue is full.
    """

    def __init__(
        self, engine: Engine, budget: DrainBudget, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._engine = engine
        self.budget = budget
        self._clock = clock
        self._held = 0  # requests in the engine (running or queued there)
        self._since = clock()
        self._changed = asyncio.Event()
        self._waiting: dict[str, asyncio.Event] = {}  # cancel key -> set when cancelled

    @property
    def held(self) -> int:
        return self._held

    @property
    def on_batch(self) -> BatchObserver | None:
        return self._engine.on_batch

    @on_batch.setter
    def on_batch(self, observer: BatchObserver | None) -> None:
        self._engine.on_batch = observer

    @property
    def info(self) -> EngineInfo:
        return self._engine.info

    async def generate(self, request: GenerationRequest) -> Generation:
        await self._enter(request.work)
        finished = False
        try:
            generation = await self._engine.generate(request)
            finished = True
            return generation
        except WorkCancelled:
            finished = True  # it held its slot until the cancel
            raise
        finally:
            self._leave(finished)

    async def score(
        self,
        messages: tuple[ChatMessage, ...],
        candidates: tuple[str, ...],
        work: WorkTag | None = None,
    ) -> Scores:
        await self._enter(work)
        finished = False
        try:
            scores = await self._engine.score(messages, candidates, work)
            finished = True
            return scores
        except WorkCancelled:
            finished = True
            raise
        finally:
            self._leave(finished)

    def count_tokens(self, text: str) -> int:
        return self._engine.count_tokens(text)

    async def cancel(self, key: str) -> bool:
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.set()  # it never reached the engine
            self._wake()
            return True
        return await self._engine.cancel(key)

    def load(self) -> Load:
        return self._engine.load()

    async def close(self) -> None:
        await self._engine.close()

    # internals

    async def _enter(self, work: WorkTag | None) -> None:
        key = work.key if work is not None else None
        cancelled = asyncio.Event()
        if key is not None:
            self._waiting[key] = cancelled
        try:
            while True:
                if cancelled.is_set():
                    raise WorkCancelled("", 0, 0)
                if work is not None and work.deadline is not None and time.time() >= work.deadline:
                    raise WorkExpired("the deadline passed while the request waited to run")
                if self._held < self.budget.limit:
                    break
                if self.budget.measured:
                    raise EngineOverloaded(
                        f"the engine holds {self._held} requests, what it can finish in "
                        f"{self.budget.drain_s:.0f} s; retry later"
                    )
                # Not measured yet: wait for the first requests to finish rather than refuse.
                changed = self._changed
                if work is not None and work.deadline is not None:
                    left = max(0.0, work.deadline - time.time())
                    try:
                        await asyncio.wait_for(changed.wait(), timeout=left)
                    except TimeoutError:
                        pass
                else:
                    await changed.wait()
        finally:
            if key is not None and self._waiting.get(key) is cancelled:
                del self._waiting[key]
        self._account()
        self._held += 1

    def _leave(self, finished: bool) -> None:
        self._account(finished=1 if finished else 0)
        self._held -= 1
        self._wake()

    def _account(self, finished: int = 0) -> None:
        now = self._clock()
        busy_s = now - self._since if self._held > 0 else 0.0
        self._since = now
        self.budget.observe(max(0.0, busy_s), finished)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

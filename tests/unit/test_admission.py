"""The drain bound: what the engine may hold so that a revoked partition drains in the grace."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.engine.base import (
    ChatMessage,
    EngineInfo,
    EngineOverloaded,
    Generation,
    GenerationRequest,
    WorkCancelled,
    WorkExpired,
    WorkTag,
)
from consumer.engine.scheduler.policy import Load
from consumer.intake.admission import DRAIN_SHARE, DrainBoundEngine, DrainBudget, drain_budget
from tests.support.waiting import wait_until

QUESTION = (ChatMessage("user", "hi"),)


# ── the budget (pure) ──


def test_until_measured_it_admits_the_slots_and_says_so() -> None:
    budget = DrainBudget(slots=4, capacity=68, drain_s=20.0)
    assert (budget.limit, budget.measured) == (4, False)
    budget.observe(1.0, 3)  # fewer than one round of the slots: no sample yet
    assert not budget.measured


def test_the_limit_is_what_finishes_within_the_drain_time() -> None:
    budget = DrainBudget(slots=4, capacity=68, drain_s=20.0)
    budget.observe(2.0, 4)  # 2 requests a second
    assert budget.measured and budget.limit == 40
    budget.observe(1.0, 4)  # 4 a second now: the estimate moves part of the way
    assert budget.rate == pytest.approx(0.7 * 2 + 0.3 * 4)
    assert budget.limit == math.floor(budget.rate * 20)


def test_the_limit_stays_between_the_slots_and_the_schedulers_capacity() -> None:
    slow = DrainBudget(slots=4, capacity=68, drain_s=20.0)
    slow.observe(100.0, 4)  # 0.04/s: not even the running work finishes in time
    assert slow.limit == 4
    fast = DrainBudget(slots=4, capacity=68, drain_s=20.0)
    fast.observe(0.1, 40)
    assert fast.limit == 68


def test_the_defaults_give_half_the_grace_to_the_engine() -> None:
    idle = {"interactive": 0, "batch": 0}
    budget = drain_budget(Load(idle, idle, running=0, slots=8, queue_limit=128), 30.0)
    assert (budget.slots, budget.capacity, budget.drain_s) == (8, 136, 30.0 * DRAIN_SHARE)
    assert budget.drain_s == pytest.approx(15.0)


@given(
    slots=st.integers(1, 32),
    queue=st.integers(0, 512),
    drain_s=st.floats(0, 120),
    samples=st.lists(st.tuples(st.floats(0, 50), st.integers(0, 64)), max_size=30),
)
def test_the_limit_never_leaves_its_bounds_and_never_outlasts_the_drain_time(
    slots: int, queue: int, drain_s: float, samples: list[tuple[float, int]]
) -> None:
    budget = DrainBudget(slots=slots, capacity=slots + queue, drain_s=drain_s)
    for busy_s, finished in samples:
        budget.observe(busy_s, finished)
        assert slots <= budget.limit <= slots + queue
        if budget.rate is not None and budget.limit > slots:
            assert budget.limit / budget.rate <= drain_s + 1e-9


# ── the gate ──


class HeldEngine:
    """Each call waits until released; counts what reached it."""

    def __init__(self) -> None:
        self.on_batch = None
        self.reached = 0
        self.release = asyncio.Event()
        self.raise_instead: Exception | None = None

    @property
    def info(self) -> EngineInfo:
        return EngineInfo("held", "held-model", True)

    async def generate(self, request: GenerationRequest) -> Generation:
        self.reached += 1
        if self.raise_instead is not None:
            raise self.raise_instead
        await self.release.wait()
        return Generation("w", "stop", 1, 1)

    async def score(self, *args: object) -> object:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        return 1

    async def cancel(self, key: str) -> bool:
        return False

    def load(self) -> Load:
        idle = {"interactive": 0, "batch": 0}
        return Load(idle, idle, running=0, slots=2, queue_limit=8)

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def gate(
    slots: int = 2, capacity: int = 10, drain_s: float = 4.0
) -> tuple[DrainBoundEngine, HeldEngine, Clock]:
    inner, clock = HeldEngine(), Clock()
    budget = DrainBudget(slots=slots, capacity=capacity, drain_s=drain_s)
    return DrainBoundEngine(inner, budget, clock=clock), inner, clock  # type: ignore[arg-type]


def ask(key: str, deadline: float | None = None) -> GenerationRequest:
    return GenerationRequest(QUESTION, max_tokens=4, work=WorkTag(key=key, deadline=deadline))


async def test_before_the_first_round_finishes_more_work_waits_instead_of_being_refused() -> None:
    engine, inner, clock = gate(slots=2, capacity=10, drain_s=4.0)
    calls = [asyncio.create_task(engine.generate(ask(f"k{n}"))) for n in range(5)]
    await wait_until(lambda: inner.reached == 2)
    assert engine.held == 2 and not any(c.done() for c in calls)
    clock.now = 2.0  # the first round of 2 takes 2 s: 1 request a second, 4 in 4 s
    inner.release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, Generation) for r in results)
    assert engine.budget.limit == 4


async def test_once_measured_work_beyond_what_drains_in_time_is_overloaded_at_once() -> None:
    engine, inner, _ = gate(slots=2, capacity=10, drain_s=4.0)
    engine.budget.observe(2.0, 2)  # 1 request a second: 4 may be held
    calls = [asyncio.create_task(engine.generate(ask(f"k{n}"))) for n in range(6)]
    await wait_until(lambda: sum(c.done() for c in calls) == 2)
    refused = [c for c in calls if c.done()]
    assert all(isinstance(c.exception(), EngineOverloaded) for c in refused)
    assert inner.reached == 4 and engine.held == 4
    inner.release.set()
    await asyncio.gather(*(c for c in calls if c not in refused))
    assert engine.held == 0


async def test_what_the_engine_itself_refuses_is_not_read_as_throughput() -> None:
    engine, inner, clock = gate(slots=1, capacity=10, drain_s=4.0)
    inner.raise_instead = WorkExpired("expired in the queue")
    clock.now = 1.0
    with pytest.raises(WorkExpired):
        await engine.generate(ask("k"))
    assert not engine.budget.measured and engine.held == 0


async def test_a_request_waiting_at_the_gate_can_be_cancelled_or_expire() -> None:
    engine, inner, _ = gate(slots=1)
    first = asyncio.create_task(engine.generate(ask("running")))
    waiting = asyncio.create_task(engine.generate(ask("waiting")))
    late = asyncio.create_task(engine.generate(ask("late", deadline=time.time() + 0.05)))
    await wait_until(lambda: inner.reached == 1)
    assert await engine.cancel("waiting")
    with pytest.raises(WorkCancelled) as cancelled:
        await waiting
    assert (cancelled.value.input_tokens, cancelled.value.output_tokens) == (0, 0)
    with pytest.raises(WorkExpired):
        await late
    assert inner.reached == 1
    inner.release.set()
    await first

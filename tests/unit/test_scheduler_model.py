"""The real policy and driver against a backend model that enforces slot limits exactly.

The model is what the llama.cpp backend promises, made strict: a start on a full backend, a
start of a job it runs already and a stop of a job it does not hold are violations (recorded,
and the test fails on any). Hypothesis drives arrivals from many tenants at both priorities,
cancels, abandoned callers, deadlines and fair-share preemption through `SchedulerLoop.cycle`
(no thread): no start is refused, every job is answered exactly once, no slot leaks, and the
loop never steps a backend that has nothing live.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.engine.base import (
    ChatMessage,
    EngineError,
    EngineOverloaded,
    Generation,
    GenerationRequest,
    WorkCancelled,
    WorkExpired,
    WorkTag,
)
from consumer.engine.scheduler.driver import Job, SchedulerLoop, SlotUnavailable, StepEvent
from consumer.engine.scheduler.policy import Plan, Policy, Work

QUESTION = (ChatMessage(role="user", content="hi"),)


class StrictBackend:
    """Exactly `slots` sequences; one token per live sequence per step; resumable."""

    name = "strict"
    model = "strict-model"
    end_of_turn_id = 0
    can_preempt = True
    step_capacity = None

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.running: dict[Job, int] = {}  # job -> tokens generated
        self.finished: set[Job] = set()  # reported its result; waits for stop
        self.violations: list[str] = []
        self.steps = 0
        self.empty_steps = 0  # steps with nothing live: the loop must not make these

    def encode_prompt(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        return [1, 2, 3]

    def encode_text(self, text: str) -> list[int]:
        return [2] * len(text)

    def check_generate(self, prompt_ids: list[int], request: GenerationRequest) -> None:
        pass

    def check_score(self, prompt_ids: list[int], candidates: list[list[int]]) -> None:
        pass

    def free_slots(self) -> int:
        return self.slots - len(self.running)

    def fits(self, job: Job, chosen: list[Job]) -> bool:
        return True

    def live(self) -> int:
        return sum(1 for job in self.running if job not in self.finished)

    def wants(self) -> dict[Job, int]:
        return {job: 1 for job in self.running if job not in self.finished}

    def start(self, job: Job) -> None:
        if job in self.running:
            self.violations.append("start of a running job")
            raise EngineError("the job is running already", retryable=False)
        if len(self.running) >= self.slots:
            self.violations.append("start on a full backend")
            raise SlotUnavailable()
        self.running[job] = job.backend_state or 0

    def stop(self, job: Job, *, preempted: bool = False) -> None:
        if job not in self.running:
            # The driver halts work it has answered; only a job it never started is unknown.
            if job.started_at is None or preempted:
                self.violations.append("stop of a job never started")
            return
        done = self.running.pop(job)
        self.finished.discard(job)
        job.backend_state = done if preempted else None

    def step(self, budget: Mapping[Job, int]) -> list[StepEvent]:
        self.steps += 1
        if not self.live():
            self.empty_steps += 1
        if set(budget) != set(self.wants()):
            self.violations.append("a step budget that is not what the live jobs want")
        events = []
        for job in list(self.running):
            if job in self.finished or not budget.get(job):
                continue
            self.running[job] += 1
            done = self.running[job]
            assert job.request is not None
            event = StepEvent(job, new_tokens=1, text="w ")
            if done >= job.request.max_tokens:
                self.finished.add(job)
                event.result = Generation(
                    text="w " * done,
                    finish_reason="length",
                    input_tokens=len(job.prompt_ids),
                    output_tokens=done,
                )
            events.append(event)
        return events

    def details(self) -> dict[str, object]:
        return {}

    def close(self) -> None:
        pass


PRIORITY = st.sampled_from(["interactive", "batch"])


def actions(tenants: int) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    return st.lists(
        st.one_of(
            # admit: tenant, priority, max_tokens, deadline after (None: none)
            st.tuples(
                st.just("admit"),
                st.sampled_from([f"t{i}" for i in range(tenants)]),
                PRIORITY,
                st.integers(1, 40),
                st.none() | st.integers(0, 30),
            ),
            st.tuples(st.just("cycle"), st.integers(1, 6)),
            st.tuples(st.just("cancel"), st.integers(0, 80)),
            st.tuples(st.just("abandon"), st.integers(0, 80)),
            st.tuples(st.just("clock"), st.integers(1, 20)),
        ),
        max_size=150,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def make_job(tag: WorkTag, max_tokens: int, outcomes: dict[Job, list[object]]) -> Job:
    request = GenerationRequest(messages=QUESTION, max_tokens=max_tokens, work=tag)
    job: Job

    def deliver(outcome: object) -> None:
        outcomes[job].append(outcome)

    job = Job(kind="generate", prompt_ids=[1, 2, 3], tag=tag, deliver=deliver, request=request)
    outcomes[job] = []
    return job


def drive(
    slots: int,
    actions: list[tuple[Any, ...]],
    *,
    fair: bool = True,
    max_queued: int = 24,
    min_run_tokens: int = 2,
) -> None:
    backend = StrictBackend(slots)
    clock = Clock()
    loop = SchedulerLoop(
        lambda: backend, max_queued=max_queued, fair_preemption=fair, clock=clock, idle_wait_s=0
    )
    policy: Policy = loop.bind(backend)
    # Fair-share pauses after a few tokens (or none), so short jobs get paused and resumed too.
    policy.min_run_tokens = min_run_tokens
    policy.patience_tokens = min_run_tokens  # 0: pause on every imbalance, to exercise pauses
    outcomes: dict[Job, list[object]] = {}
    jobs: list[Job] = []
    abandoned: set[Job] = set()
    cancels: list[bool] = []
    for action in actions:
        if action[0] == "admit":
            _, tenant, priority, max_tokens, after = action
            deadline = None if after is None else clock.now + after
            tag = WorkTag(tenant, priority, deadline, key=f"k{len(jobs)}")
            job = make_job(tag, max_tokens, outcomes)
            jobs.append(job)
            assert loop.submit(job)
        elif action[0] == "cycle":
            for _ in range(action[1]):
                assert loop.cycle(backend, policy)
        elif action[0] == "cancel":
            loop.cancel(f"k{action[1]}", cancels.append)
        elif action[0] == "abandon":
            if action[1] < len(jobs):
                abandoned.add(jobs[action[1]])
                loop.abandon(jobs[action[1]])
        else:
            clock.now += action[1]
        assert len(backend.running) <= slots
        assert len(policy.running) <= slots
    # Drain: everything still open ends (each cycle takes the whole inbox first).
    for _ in range(5_000):
        assert loop.cycle(backend, policy)
        if not policy.running and policy.queued == 0:
            break
    assert backend.violations == []
    assert backend.empty_steps == 0
    assert loop.stats.refused_starts == 0 and loop.stats.disagreements == 0
    assert not policy.running and policy.queued == 0
    assert backend.running == {}, "a slot leaked"
    for job in jobs:
        answers = outcomes[job]
        if job in abandoned and not answers:
            continue
        assert len(answers) == 1, f"{job.tag.key} answered {len(answers)} times"
        answer = answers[0]
        assert isinstance(answer, Generation | WorkCancelled | WorkExpired | EngineOverloaded), (
            answer
        )
        if isinstance(answer, Generation):
            assert answer.output_tokens == job.max_tokens
    # Once every sequence is stopped, the loop closes cleanly.
    loop.close()
    assert loop.cycle(backend, policy) is False


@settings(max_examples=300, deadline=None)
@given(
    slots=st.integers(1, 8),
    steps=st.integers(2, 16).flatmap(actions),
    min_run_tokens=st.sampled_from([0, 2]),
)
def test_the_driver_never_asks_the_backend_for_what_it_cannot_do(
    slots: int, steps: list[tuple[Any, ...]], min_run_tokens: int
) -> None:
    drive(slots, steps, min_run_tokens=min_run_tokens)


@settings(max_examples=50, deadline=None)
@given(slots=st.integers(1, 8), steps=actions(8))
def test_without_fair_preemption_the_same_holds(slots: int, steps: list[tuple[Any, ...]]) -> None:
    drive(slots, steps, fair=False)


def test_a_plan_that_fills_a_slot_and_swaps_asks_for_no_slot_the_backend_lacks() -> None:
    """The held-out failure, step by step: a1 ends, b arrives; the plan starts a3 in the free
    slot and pauses one of a's for b — a2, never a3 (the old policy paused a3, so the backend
    was asked to stop what it never had and to start two jobs in one slot)."""
    drive(
        2,
        [
            ("admit", "a", "interactive", 1, None),
            ("admit", "a", "interactive", 40, None),
            ("admit", "a", "interactive", 40, None),
            ("cycle", 1),
            ("admit", "b", "interactive", 5, None),
            ("cycle", 3),
        ],
        min_run_tokens=0,
    )


def test_a_backlog_of_many_tenants_is_answered_without_refused_starts() -> None:
    """The held-out shape: 96 requests from 16 tenants waiting before the loop starts."""
    actions: list[tuple[Any, ...]] = [
        ("admit", f"t{i % 16}", "interactive", 3 + (i % 7), None) for i in range(96)
    ]
    actions += [("cycle", 6)] * 40
    drive(8, actions, max_queued=128)


def test_a_plan_never_preempts_work_it_starts() -> None:
    """The fair-share swap of a plan that also filled a free slot: the old policy paused the
    work it had just started (the latest started), so the backend was told to start it and
    the swapped-in work with one slot free ("no free slot", then "running already")."""
    policy = Policy(slots=2, max_queued=100, min_run_tokens=0, patience_tokens=0)
    a1, a2, a3 = (Work("a", "interactive", 3, 50) for _ in range(3))
    for w in (a1, a2, a3):
        policy.admit(w)
    policy.schedule()  # a1, a2 run
    policy.charge(a1, 5)
    policy.charge(a2, 5)
    policy.finish(a1)
    b1 = Work("b", "interactive", 3, 50)
    policy.admit(b1)  # lifted to a's counter; a3 is older, so it takes the free slot first
    plan = policy.schedule(free_slots=1)
    assert plan.start == (a3, b1)
    assert plan.preempt == (a2,)  # not a3, which this plan starts
    assert len(plan.start) - len(plan.preempt) == 1  # exactly the one free slot
    assert {w.tenant for w in policy.running} == {"a", "b"}


def test_work_that_has_not_progressed_since_it_resumed_is_not_paused_again() -> None:
    policy = Policy(slots=2, max_queued=100, min_run_tokens=4, patience_tokens=0)
    a1, a2 = Work("a", "interactive", 3, 50), Work("a", "interactive", 3, 50)
    policy.admit(a1)
    policy.admit(a2)
    policy.schedule()
    policy.charge(a1, 3)  # below min_run_tokens: neither may be paused yet
    policy.charge(a2, 3)
    policy.admit(Work("b", "interactive", 3, 50))
    assert policy.schedule() == Plan()
    policy.charge(a2, 1)
    assert policy.schedule().preempt == (a2,)

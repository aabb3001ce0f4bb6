"""The scheduling policy: fairness, priority, deadlines, cancellation, bounds (pure)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.engine.scheduler.policy import (
    MAX_PREEMPTIONS,
    Plan,
    Policy,
    QueueFull,
    Work,
    allot_step_tokens,
)


def work(
    tenant: str, *, priority: str = "interactive", prompt: int = 10, out: int = 10, **kw: Any
) -> Work:
    return Work(tenant, priority, prompt_tokens=prompt, max_tokens=out, **kw)  # type: ignore[arg-type]


def run_to_completion(policy: Policy, tokens_per_step: int = 1) -> list[Work]:
    """Start what the policy plans, finish every running work after one step; start order."""
    order: list[Work] = []
    for _ in range(10_000):
        plan = policy.schedule()
        order.extend(plan.start)
        if not policy.running:
            break
        for running in policy.running:
            policy.charge(running, tokens_per_step)
            policy.finish(running)
    return order


def test_a_flooding_tenant_does_not_starve_a_later_one() -> None:
    policy = Policy(slots=1, max_queued=100)
    for _ in range(64):
        policy.admit(work("flood"))
    first = policy.schedule().start
    assert [w.tenant for w in first] == ["flood"]
    policy.admit(work("quiet"))
    policy.charge(first[0], 10)
    policy.finish(first[0])
    # The quiet tenant's counter was lifted to the flood's, which grew by what it was served.
    assert [w.tenant for w in policy.schedule().start] == ["quiet"]


def test_an_idle_tenant_banks_no_credit() -> None:
    policy = Policy(slots=1, max_queued=100)
    policy.admit(work("a"))
    run_to_completion(policy, tokens_per_step=50)
    before = policy.counter("a")
    policy.admit(work("b"))  # b was idle all along: it joins at a's level, not at zero
    assert policy.counter("b") == before


def test_interactive_work_starts_before_batch_work() -> None:
    policy = Policy(slots=2, max_queued=100)
    batch = [work("a", priority="batch") for _ in range(3)]
    for w in batch:
        policy.admit(w)
    interactive = work("b")
    policy.admit(interactive)
    assert policy.schedule().start[0] is interactive


def test_interactive_work_preempts_running_batch_work_when_slots_are_full() -> None:
    policy = Policy(slots=2, max_queued=100)
    first, second = work("a", priority="batch"), work("a", priority="batch")
    policy.admit(first)
    policy.admit(second)
    policy.schedule()
    policy.charge(second, 3)
    urgent = work("b")
    policy.admit(urgent)
    plan = policy.schedule()
    assert plan.preempt == (second,)  # the latest started batch work
    assert plan.start == (urgent,)
    assert second.state == "queued" and second.served_tokens == 3
    # ... and it resumes (front of its tenant's queue) once a slot frees.
    policy.finish(urgent)
    assert policy.schedule().start == (second,)


def test_without_preemption_interactive_work_waits_for_a_free_slot() -> None:
    policy = Policy(slots=1, max_queued=100, can_preempt=False)
    batch = work("a", priority="batch")
    policy.admit(batch)
    policy.schedule()
    policy.admit(work("b"))
    assert policy.schedule().start == ()
    policy.finish(batch)
    assert [w.tenant for w in policy.schedule().start] == ["b"]


def test_a_tenant_below_its_fair_share_takes_slots_from_the_one_above_it() -> None:
    policy = Policy(slots=4, max_queued=100)
    flood = [work("a", out=100) for _ in range(10)]
    for w in flood:
        policy.admit(w)
    for running in policy.schedule().start:  # a runs 4: every slot
        policy.charge(running, policy.min_run_tokens)  # progress enough to be paused
    newcomers = [work("b", out=100), work("b", out=100), work("b", out=100)]
    for w in newcomers:
        policy.admit(w)
    plan = policy.schedule()
    # Two tenants: a fair share is 2 slots each; b gets 2 now, the latest two of a's pause.
    assert plan.start == tuple(newcomers[:2])
    assert plan.preempt == (flood[3], flood[2])
    assert {w.tenant for w in policy.running} == {"a", "b"}
    assert policy.schedule() == Plan()  # at its share: nothing more moves
    # The paused ones resume first when a's turn comes (front of a's queue).
    policy.finish(newcomers[0])
    policy.finish(newcomers[1])
    assert set(policy.schedule().start) <= {flood[2], flood[3], newcomers[2]}


def test_fair_share_preemption_needs_a_backend_that_can_resume() -> None:
    for policy in (
        Policy(slots=2, max_queued=100, can_preempt=False),
        Policy(slots=2, max_queued=100, fair_preemption=False),
    ):
        for _ in range(4):
            policy.admit(work("a"))
        policy.schedule()
        policy.admit(work("b"))
        assert policy.schedule() == Plan()


def test_no_pause_when_a_slot_frees_within_a_few_steps_anyway() -> None:
    policy = Policy(slots=2, max_queued=100, min_run_tokens=0, patience_tokens=8)
    long, short = work("a", out=100), work("a", out=20)
    policy.admit(long)
    policy.admit(short)
    policy.schedule()
    policy.charge(short, 12)  # 8 tokens left: its slot frees soon
    policy.admit(work("b"))
    assert policy.schedule() == Plan()
    policy.patience_tokens = 4
    assert policy.schedule().preempt == (short,)  # 8 left is more than the patience now


def test_work_paused_too_often_is_not_paused_again() -> None:
    policy = Policy(slots=2, max_queued=100, min_run_tokens=0)
    first, second = work("a"), work("a")
    policy.admit(first)
    policy.admit(second)
    policy.schedule()
    second.preemptions = first.preemptions = MAX_PREEMPTIONS
    policy.admit(work("b"))
    assert policy.schedule() == Plan()


def test_queued_work_past_its_deadline_expires_without_running() -> None:
    policy = Policy(slots=1, max_queued=100)
    running = work("a")
    policy.admit(running)
    policy.schedule()
    late, later = work("a", deadline=100.0), work("a", deadline=200.0)
    policy.admit(late)
    policy.admit(later)
    assert policy.expire(150.0) == [late]
    assert late.state == "done"
    assert running.state == "running"  # running work is not expired by the policy
    policy.finish(running)
    assert policy.schedule().start == (later,)


def test_cancel_finds_queued_and_running_work_by_key() -> None:
    policy = Policy(slots=1, max_queued=100)
    running, queued = work("a", key="a/1"), work("a", key="a/2")
    policy.admit(running)
    policy.schedule()
    policy.admit(queued)
    assert policy.cancel("a/2") == (queued, "queued")
    assert policy.cancel("a/1") == (running, "running")
    assert policy.cancel("a/1") is None  # already ended
    assert policy.cancel("nope") is None
    assert not policy.running and policy.queued == 0


def test_the_queue_is_bounded_beyond_the_free_slots() -> None:
    policy = Policy(slots=2, max_queued=2)
    for _ in range(4):  # a burst: two will start at the next schedule, two wait
        policy.admit(work("a"))
    with pytest.raises(QueueFull):
        policy.admit(work("b"))
    policy.schedule()  # two start: the queue holds its two
    with pytest.raises(QueueFull):
        policy.admit(work("b"))
    policy.finish(policy.running[0])  # a slot frees: room for one more
    policy.admit(work("b"))


def test_fits_passes_over_work_without_losing_its_place() -> None:
    policy = Policy(slots=4, max_queued=100)
    big, small = work("a", prompt=500), work("a", prompt=5)
    policy.admit(big)
    policy.admit(small)
    plan = policy.schedule(fits=lambda w, chosen: w.prompt_tokens < 100)
    assert plan.start == (small,)
    assert policy.schedule().start == (big,)


def test_load_reports_queued_requests_and_tokens_per_priority() -> None:
    policy = Policy(slots=1, max_queued=100)
    policy.admit(work("a", prompt=7, out=3))
    policy.admit(work("a", prompt=7, out=3))
    policy.admit(work("b", priority="batch", prompt=1, out=1))
    policy.schedule()
    load = policy.load()
    assert load.queued_requests == {"interactive": 1, "batch": 1}
    assert load.queued_tokens == {"interactive": 10, "batch": 2}
    assert (load.running, load.slots, load.occupancy) == (1, 1, 1.0)


# -- properties ------------------------------------------------------------------------

TENANTS = st.sampled_from(["a", "b", "c", "d"])
PRIORITY = st.sampled_from(["interactive", "batch"])
ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), TENANTS, PRIORITY, st.integers(1, 50), st.booleans()),
        st.tuples(st.just("step"), st.integers(1, 20)),
        st.tuples(st.just("cancel"), st.integers(0, 60)),
        st.tuples(st.just("expire"), st.integers(0, 60)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(slots=st.integers(1, 4), max_queued=st.integers(1, 12), actions=ACTIONS)
def test_every_admitted_work_ends_exactly_once_and_bounds_hold(
    slots: int, max_queued: int, actions: list[tuple]
) -> None:
    policy = Policy(slots=slots, max_queued=max_queued)
    admitted: list[Work] = []
    ended: Counter[int] = Counter()
    clock = 0
    for action in actions:
        if action[0] == "admit":
            _, tenant, priority, tokens, with_deadline = action
            item = work(
                tenant,
                priority=priority,
                out=tokens,
                key=f"k{len(admitted)}",
                deadline=clock + tokens if with_deadline else None,
            )
            try:
                policy.admit(item)
            except QueueFull:
                assert policy.queued >= max_queued + slots - len(policy.running)
                continue
            admitted.append(item)
        elif action[0] == "step":
            plan = policy.schedule()
            # Priority: nothing batch starts while interactive work still waits.
            if any(w.priority == "batch" for w in plan.start):
                assert policy.load().queued_requests["interactive"] == 0
            for running in policy.running:
                policy.charge(running, 1)
                if running.served_tokens >= running.max_tokens or action[1] % 3 == 0:
                    policy.finish(running)
                    ended[id(running)] += 1
        elif action[0] == "cancel":
            found = policy.cancel(f"k{action[1]}")
            if found is not None:
                ended[id(found[0])] += 1
        else:
            clock += action[1]
            for expired in policy.expire(clock):
                assert expired.state == "done"
                ended[id(expired)] += 1
        assert len(policy.running) <= slots
        # The bound holds for new work; preempted work may come back on top of it.
        assert policy.queued <= max_queued + slots
    # Drain: everything still open ends, and nothing ends twice.
    for _ in range(10_000):
        plan = policy.schedule()
        if not policy.running and policy.queued == 0:
            break
        for running in policy.running:
            policy.finish(running)
            ended[id(running)] += 1
    assert all(ended[id(w)] == 1 for w in admitted)
    assert sum(ended.values()) == len(admitted)


@settings(max_examples=200, deadline=None)
@given(
    backlog=st.integers(1, 60),
    others=st.lists(st.tuples(TENANTS, st.integers(0, 5)), max_size=6),
    slots=st.integers(1, 4),
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=8),
)
def test_a_newcomer_starts_within_one_start_per_other_active_tenant(
    backlog: int, others: list[tuple[str, int]], slots: int, lengths: list[int]
) -> None:
    """No starvation: however deep one tenant's backlog, a new tenant's request starts after
    at most one more start per other tenant with queued work."""
    policy = Policy(slots=slots, max_queued=1_000)
    for i in range(backlog):
        policy.admit(work("flood", out=lengths[i % len(lengths)]))
    for tenant, extra in others:
        for _ in range(extra):
            policy.admit(work(tenant))
    for running in policy.schedule().start:
        policy.charge(running, running.max_tokens)
    newcomer = work("newcomer")
    policy.admit(newcomer)
    active = {w.tenant for w in _queued(policy)} - {"newcomer"}
    starts_before = 0
    for _ in range(10_000):
        for running in policy.running:
            policy.finish(running)
        plan = policy.schedule()
        if newcomer in plan.start:
            starts_before += plan.start.index(newcomer)
            break
        starts_before += len(plan.start)
        for running in plan.start:
            policy.charge(running, running.max_tokens)
    assert newcomer.state == "running"
    assert starts_before <= len(active)


def _queued(policy: Policy) -> list[Work]:
    return [w for q in policy._queues["interactive"].values() for w in q]


# -- the per-step token budget ---------------------------------------------------------------


def test_every_generating_request_gets_its_token_before_any_prompt_chunk() -> None:
    wants = [("long prompt", 300), ("gen a", 1), ("short prompt", 20), ("gen b", 1)]
    budget = allot_step_tokens(wants, step_tokens=128, capacity=512)
    assert budget == {"gen a": 1, "gen b": 1, "long prompt": 128}


def test_prompt_chunks_go_in_start_order_within_step_tokens() -> None:
    wants = [("first", 100), ("second", 50), ("third", 10)]
    assert allot_step_tokens(wants, step_tokens=128, capacity=None) == {
        "first": 100,
        "second": 28,
    }
    assert allot_step_tokens(wants, step_tokens=None, capacity=None) == dict(wants)


def test_the_budget_never_exceeds_what_one_step_holds() -> None:
    wants = [("gen a", 1), ("gen b", 1), ("prompt", 100)]
    budget = allot_step_tokens(wants, step_tokens=None, capacity=8)
    assert budget == {"gen a": 1, "gen b": 1, "prompt": 6}
    assert sum(budget.values()) == 8


def test_policy_step_budget_follows_start_order_and_skips_work_not_running() -> None:
    policy = Policy(slots=3, max_queued=10, step_tokens=16)
    works = [Work(tenant=t, priority="interactive", prompt_tokens=40, max_tokens=8) for t in "abc"]
    for work in works:
        policy.admit(work)
    plan = policy.schedule()
    first, second, third = plan.start
    outsider = Work(tenant="z", priority="interactive", prompt_tokens=5, max_tokens=1)
    budget = policy.step_budget({third: 40, second: 1, first: 40, outsider: 5}, capacity=512)
    assert budget == {second: 1, first: 16}

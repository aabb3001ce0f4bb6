"""Which admitted work runs next: fairness between tenants, priority, deadlines, cancellation.

Pure: no threads, no clocks of its own, no engine. A backend's driver asks `schedule()` what
to start (and what to preempt) whenever it has a step to run, and tells the policy what
happened (`charge`, `finish`, `requeue`). The vLLM split: deciding what runs is apart from
running it.

Fairness is a virtual token counter per tenant (Sheng et al., "Fairness in Serving Large
Language Models", OSDI 2024): a tenant's counter grows with the tokens served to it (prompt
tokens when its work starts, `output_weight` per generated token), and the next work to start
is the head of the queue of the tenant with the lowest counter. A tenant that had nothing
queued has its counter lifted to the lowest counter among tenants with work, so idling banks
no credit, and a tenant that floods the queue only ever competes with its own backlog: another
tenant's new request starts at the next free slot after at most one start per other active
tenant.

Priority: `interactive` work always starts before `batch` work. When interactive work is
waiting and no slot is free, the policy preempts running batch work (latest started first) if
the backend can resume it, so batch work never holds interactive work back by more than the
step in progress.

The per-step token budget is the policy's too (vLLM v1's `schedule()` owns it): before every
step, `step_budget` says how many tokens each running request computes (every generating one
its next token, prompt chunks in start order up to `step_tokens`), and the backend computes
exactly that.

A plan is consistent by construction, so a backend is never asked for what it cannot do: the
slots a plan fills are the backend's free slots plus one per preemption in the same plan
(the driver stops the preempted work before it starts anything), work started in a plan is
never preempted by it, and work preempted by a plan is never started by it. Fair-share
preemption only pauses work that has made progress since it last started
(`min_run_tokens`), so a paused request always gets somewhere before it can be paused again
(at most `MAX_PREEMPTIONS` times), and only while no running work is within
`patience_tokens` of its budget: when a slot frees within a few steps anyway, waiting for it
costs less than a pause and its resume (measured: pausing on every imbalance cost 10% of the
throughput of a 3-heavy-tenant load and bought the light tenant nothing; against one
tenant's flood whose requests end together, it cut the light tenant's latency from 2.3x to
1.05x its latency alone at 0.99x the throughput).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Literal, TypeVar

from consumer.engine.base import PRIORITIES, Load, Priority

WorkState = Literal["queued", "running", "done"]


MAX_PREEMPTIONS = 3  # a work paused this often is never taken again: it must finish


K = TypeVar("K")


def allot_step_tokens(
    wants: Iterable[tuple[K, int]], *, step_tokens: int | None, capacity: int | None
) -> dict[K, int]:
    """How many tokens each of `wants` (what each running request asks to compute at the next
    step, in start order) computes at it: the per-step token budget.

    Every request asking for one token (a generating sequence's next) gets it: a step never
    holds a stream back for a prompt. Then prompt and label tokens go out in start order, at
    most `step_tokens` of them (None: no limit) and no more than `capacity` (the most one step
    holds; None: no limit) leaves; a prompt that does not fit takes the rest at the next steps
    (chunked prefill). Prefill is compute-bound: a step holding 512 prompt tokens takes ~2 s
    on 2 cores, and every running sequence, and every request waiting for a slot, waits for it.
    """
    asked = list(wants)
    budget = {key: 1 for key, tokens in asked if tokens == 1}
    left = sum(tokens for _, tokens in asked) if step_tokens is None else step_tokens
    if capacity is not None:
        left = min(left, capacity - len(budget))
    for key, tokens in asked:
        if tokens <= 1 or left <= 0:
            continue
        budget[key] = min(tokens, left)
        left -= budget[key]
    return budget


def default_queue_limit(slots: int) -> int:
    """Requests the queue holds beyond those running when no limit is configured: 16x the
    slots, at least 64 (the one default every backend's scheduler uses).

    Fairness only orders what the scheduler holds: a queue that takes a burst whole lets
    another tenant's request in ahead of the burst's tail, instead of behind it in Kafka.
    """
    return max(64, 16 * slots)


class QueueFull(Exception):
    """The queue holds `max_queued` requests already; try again later."""


@dataclass(eq=False)
class Work:
    """One admitted request as the policy sees it (compared by identity)."""

    tenant: str
    priority: Priority
    prompt_tokens: int
    max_tokens: int
    deadline: float | None = None  # in the clock the driver passes to `expire`
    key: str | None = None  # what `cancel` finds it by (e.g. tenant + request id)
    payload: Any = None  # the driver's own state (future, backend sequence, ...)
    state: WorkState = "queued"
    served_tokens: int = 0  # generated so far (survives preemption)
    served_at_start: int = 0  # served_tokens when it last started (progress since then)
    preemptions: int = 0
    seq: int = field(default=0)  # arrival order, set by admit

    @property
    def queued_tokens(self) -> int:
        """What this work still asks of the engine: prompt + remaining output budget."""
        return self.prompt_tokens + max(0, self.max_tokens - self.served_tokens)


# fits(work, chosen so far in this plan) -> whether the backend's shape limits (a padded
# batch, a score-only slot) let `work` start beside `chosen`; how many slots are free is the
# policy's count (`schedule(free_slots)` plus what the plan preempts), not `fits`'s.
Fits = Callable[[Work, list[Work]], bool]


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do before the next step: stop `preempt` (they go back to the queue), then
    start `start` in this order."""

    start: tuple[Work, ...] = ()
    preempt: tuple[Work, ...] = ()


class Policy:
    """The queue of admitted work and the rule for what joins the running batch next."""

    def __init__(
        self,
        *,
        slots: int,
        max_queued: int,
        can_preempt: bool = True,
        fair_preemption: bool = True,
        prompt_weight: float = 1.0,
        output_weight: float = 2.0,
        min_run_tokens: int = 16,
        patience_tokens: int = 16,
        step_tokens: int | None = None,
    ) -> None:
        """`step_tokens`: prompt and label tokens one step computes at most, besides one
        token per generating request (None: as many as the backend's step holds)."""
        if slots < 1 or max_queued < 1:
            raise ValueError("slots and max_queued must be at least 1")
        self.slots = slots
        self.max_queued = max_queued
        self.can_preempt = can_preempt
        self.fair_preemption = fair_preemption
        self._prompt_weight = prompt_weight
        self._output_weight = output_weight
        self.min_run_tokens = min_run_tokens
        self.patience_tokens = patience_tokens
        self.step_tokens = step_tokens
        # priority -> tenant -> that tenant's queue, oldest (or preempted) first
        self._queues: dict[Priority, dict[str, deque[Work]]] = {p: {} for p in PRIORITIES}
        self._running: list[Work] = []  # in start order
        self._counters: dict[str, float] = {}
        self._by_key: dict[str, Work] = {}
        self._arrivals = count(1)
        self._queued = 0

    # -- what the driver tells the policy -----------------------------------------------

    def admit(self, work: Work) -> None:
        """Queue new work; QueueFull when `max_queued` requests wait beyond the free slots.

        Work arriving together (a burst fetched at once) is admitted before the next
        `schedule` starts any of it, so the free slots count as room too.
        """
        free = max(0, self.slots - len(self._running))
        if self._queued >= self.max_queued + free:
            raise QueueFull(f"{self._queued} requests are queued (the limit)")
        if not self._active(work.tenant):
            self._lift(work.tenant)
        work.seq = next(self._arrivals)
        work.state = "queued"
        self._enqueue(work, front=False)
        if work.key is not None:
            self._by_key[work.key] = work

    def cancel(self, key: str) -> tuple[Work, WorkState] | None:
        """End the work admitted under `key` and say where it was (queued or running).

        None if there is none (finished, expired or unknown). A running one's backend
        sequence must be stopped by the caller.
        """
        work = self._by_key.get(key)
        if work is None:
            return None
        return work, self.drop(work)

    def drop(self, work: Work) -> WorkState:
        """End `work` wherever it is (its caller went away); returns where it was."""
        was = work.state
        if was == "queued":
            self._dequeue(work)
        elif was == "running":
            self._running.remove(work)
        self._end(work)
        return was

    def expire(self, now: float) -> list[Work]:
        """Queued work whose deadline is at or before `now`; it is done (never run)."""
        expired = [
            w
            for queues in self._queues.values()
            for queue in queues.values()
            for w in queue
            if w.deadline is not None and w.deadline <= now
        ]
        for work in expired:
            self._dequeue(work)
            self._end(work)
        return expired

    def charge(self, work: Work, output_tokens: int) -> None:
        """`output_tokens` more were generated for running `work`."""
        work.served_tokens += output_tokens
        self._counters[work.tenant] = (
            self._counters.get(work.tenant, 0.0) + output_tokens * self._output_weight
        )

    def finish(self, work: Work) -> None:
        """Running `work` ended (its reply is on its way); its slot is free."""
        if work.state != "running":
            return
        self._running.remove(work)
        self._end(work)

    def requeue(self, work: Work) -> None:
        """Put running `work` back at the front of its tenant's queue (it keeps its progress)."""
        if work.state != "running":
            return
        self._running.remove(work)
        work.preemptions += 1
        work.state = "queued"
        self._enqueue(work, front=True)

    def unstart(self, work: Work) -> None:
        """The backend refused to start `work` this plan started: back to the front of its
        queue as if never started (no preemption counted, its prompt not charged twice)."""
        if work.state != "running":
            return
        self._running.remove(work)
        if work.preemptions == 0 or work.served_tokens == 0:
            self._counters[work.tenant] -= work.prompt_tokens * self._prompt_weight
        work.state = "queued"
        self._enqueue(work, front=True)

    # -- what the policy decides --------------------------------------------------------

    def schedule(self, free_slots: int | None = None, fits: Fits | None = None) -> Plan:
        """What starts (and what is preempted for it) before the next step.

        `free_slots` (the backend's own count; default: the slots not running work) plus one
        per preemption in the plan is how many works the plan starts at most. `fits(work,
        chosen)` lets a backend with shape limits pass over work it cannot take now; the next
        work in policy order is considered instead, and the passed-over work keeps its place.
        Only work running before this call is preempted, and preempted work is not started
        again by the same plan.
        """
        free = self.slots - len(self._running) if free_slots is None else free_slots
        preempt: list[Work] = []
        passed: set[int] = set()  # not to start in this plan (refused by fits, or preempted)
        if self.can_preempt:
            waiting = self._count("interactive")
            batch_running = [w for w in reversed(self._running) if w.priority == "batch"]
            while waiting > free and batch_running:
                victim = batch_running.pop(0)
                self.requeue(victim)
                passed.add(id(victim))
                preempt.append(victim)
                free += 1
        start: list[Work] = []
        while free > 0:
            work = self._next(passed)
            if work is None:
                break
            if fits is not None and not fits(work, start):
                passed.add(id(work))
                continue
            self._begin(work)
            start.append(work)
            free -= 1
        if self.can_preempt and self.fair_preemption:
            # Slots are full: a tenant below its fair share takes one from a tenant above it.
            # The victim's slot is the newcomer's: one out, one in, the count stays right.
            fresh = {id(w) for w in start}
            while (swap := self._share_swap(passed, fresh)) is not None:
                work, victim = swap
                if fits is not None and not fits(work, start):
                    passed.add(id(work))
                    continue
                self.requeue(victim)
                passed.add(id(victim))
                preempt.append(victim)
                self._begin(work)
                passed.add(id(work))
                fresh.add(id(work))
                start.append(work)
        return Plan(start=tuple(start), preempt=tuple(preempt))

    def step_budget(self, wants: Mapping[Work, int], capacity: int | None) -> dict[Work, int]:
        """Tokens each running work computes at the next step (see `allot_step_tokens`).

        Called before every step, after the plan's starts: `wants` is what each running work
        asks for (the backend's count: the rest of its prompt, one token while it
        generates), `capacity` the most one step of the backend holds. The backend computes
        what this says, no more (vLLM v1's `schedule()`: the scheduler owns the budget).
        """
        asked = [(w, wants[w]) for w in self._running if wants.get(w, 0) > 0]
        return allot_step_tokens(asked, step_tokens=self.step_tokens, capacity=capacity)

    def _share_swap(self, passed: set[int], fresh: set[int]) -> tuple[Work, Work] | None:
        """(waiting work of a tenant below its fair share, running work of the tenant most
        above it) of the most urgent priority with waiting work, or None.

        A fair share is the slots over the tenants with work of that priority. Only work of the
        same priority is taken, the latest started first, and only work that `_pausable`
        (not started in this plan, `fresh`; progressed since it started; paused fewer than
        `MAX_PREEMPTIONS` times).
        """
        for priority in PRIORITIES:
            queues = self._queues[priority]
            if not queues:
                continue
            running: dict[str, list[Work]] = {}
            for w in self._running:
                if w.priority == priority:
                    running.setdefault(w.tenant, []).append(w)
            if any(w.max_tokens - w.served_tokens <= self.patience_tokens for w in self._running):
                return None  # a slot frees within a few steps anyway: waiting is cheaper
            share = max(1, self.slots // len(set(queues) | set(running)))
            over = [
                (len(works), self._counters.get(tenant, 0.0), tenant)
                for tenant, works in running.items()
                if len(works) > share and any(self._pausable(w, fresh) for w in works)
            ]
            if not over:
                return None
            for tenant in sorted(queues, key=lambda t: self._counters.get(t, 0.0)):
                if len(running.get(tenant, ())) >= share:
                    continue
                head = next((w for w in queues[tenant] if id(w) not in passed), None)
                if head is None:
                    continue
                victim_tenant = max(over)[2]
                victim = next(
                    w for w in reversed(running[victim_tenant]) if self._pausable(w, fresh)
                )
                return head, victim
            return None
        return None

    def _pausable(self, work: Work, fresh: set[int]) -> bool:
        return (
            id(work) not in fresh
            and work.preemptions < MAX_PREEMPTIONS
            and work.served_tokens - work.served_at_start >= self.min_run_tokens
        )

    # -- what the policy reports --------------------------------------------------------

    @property
    def running(self) -> tuple[Work, ...]:
        return tuple(self._running)

    @property
    def queued(self) -> int:
        return self._queued

    def counter(self, tenant: str) -> float:
        return self._counters.get(tenant, 0.0)

    def load(self) -> Load:
        requests = {p: self._count(p) for p in PRIORITIES}
        tokens = {
            p: sum(w.queued_tokens for q in self._queues[p].values() for w in q) for p in PRIORITIES
        }
        return Load(requests, tokens, len(self._running), self.slots, self.max_queued)

    # -- internals ----------------------------------------------------------------------

    def _next(self, passed: set[int]) -> Work | None:
        for priority in PRIORITIES:
            best: Work | None = None
            best_rank: tuple[float, int] | None = None
            for tenant, queue in self._queues[priority].items():
                head = next((w for w in queue if id(w) not in passed), None)
                if head is None:
                    continue
                rank = (self._counters.get(tenant, 0.0), head.seq)
                if best_rank is None or rank < best_rank:
                    best, best_rank = head, rank
            if best is not None:
                return best
        return None

    def _begin(self, work: Work) -> None:
        self._dequeue(work)
        work.state = "running"
        work.served_at_start = work.served_tokens
        self._running.append(work)
        if work.preemptions == 0 or work.served_tokens == 0:
            self._counters[work.tenant] = self._counters.get(work.tenant, 0.0) + (
                work.prompt_tokens * self._prompt_weight
            )

    def _enqueue(self, work: Work, *, front: bool) -> None:
        queue = self._queues[work.priority].setdefault(work.tenant, deque())
        if front:
            queue.appendleft(work)
        else:
            queue.append(work)
        self._queued += 1

    def _dequeue(self, work: Work) -> None:
        queues = self._queues[work.priority]
        queue = queues[work.tenant]
        queue.remove(work)
        if not queue:
            del queues[work.tenant]
        self._queued -= 1

    def _end(self, work: Work) -> None:
        work.state = "done"
        if work.key is not None and self._by_key.get(work.key) is work:
            del self._by_key[work.key]

    def _count(self, priority: Priority) -> int:
        return sum(len(q) for q in self._queues[priority].values())

    def _active(self, tenant: str) -> bool:
        return any(tenant in self._queues[p] for p in PRIORITIES) or any(
            w.tenant == tenant for w in self._running
        )

    def _lift(self, tenant: str) -> None:
        """A tenant (re)joining must not bring credit saved while it was idle."""
        active = {w.tenant for w in self._running}
        for priority in PRIORITIES:
            active.update(self._queues[priority])
        active.discard(tenant)
        own = self._counters.get(tenant, 0.0)
        if active:
            self._counters[tenant] = max(own, min(self._counters.get(t, 0.0) for t in active))
        elif self._counters:
            self._counters[tenant] = max(own, max(self._counters.values()))

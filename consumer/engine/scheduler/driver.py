"""The scheduler's loop: one thread asks the policy what runs and steps the backend.

A backend (llama.cpp slots, exllamav2's padded or paged batches) only runs what it is given,
one step at a time; everything about order — fairness, priority, deadlines, cancellation,
preemption — is decided here, by `Policy`, the same way for every backend.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from consumer.engine.base import (
    BatchObserver,
    ChatMessage,
    EngineError,
    EngineOverloaded,
    Generation,
    GenerationRequest,
    Load,
    Scores,
    WorkCancelled,
    WorkExpired,
    WorkTag,
    is_out_of_memory,
)
from consumer.engine.scheduler.policy import Policy, QueueFull, Work

log = logging.getLogger(__name__)

Deliver = Callable[[object], None]  # thread-safe: resolves the caller's future


@dataclass(eq=False)
class Job:
    """One generate or score request on its way through the scheduler and a backend."""

    kind: Literal["generate", "score"]
    prompt_ids: list[int]
    tag: WorkTag
    deliver: Deliver
    request: GenerationRequest | None = None  # generate
    candidates: list[list[int]] = field(default_factory=list)  # score: token ids per label
    on_text: Callable[[str], None] | None = None  # thread-safe hop to the caller's loop
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None
    text: str = ""  # streamed so far (what a cancelled job reports)
    output_tokens: int = 0
    # Whatever the backend keeps for this job across steps, and across a preemption (the
    # tokens generated so far, sampler state); the driver never looks inside.
    backend_state: Any = None
    # Tokens the backend computed again when it last resumed this job after a pause (what
    # the pause cost; 0 where its cache survived).
    resumed_prefill: int = 0
    work: Work | None = None

    @property
    def max_tokens(self) -> int:
        if self.request is not None:
            return self.request.max_tokens
        return sum(len(c) for c in self.candidates)


@dataclass(slots=True)
class StepEvent:
    """What one step did for one job: new tokens and text, and its end if it ended."""

    job: Job
    new_tokens: int = 0
    text: str = ""
    result: Generation | Scores | None = None
    error: EngineError | None = None


class SlotUnavailable(EngineError):
    """The backend has no slot for a job now: the scheduler requeues it (never answered)."""

    def __init__(self, message: str = "no free slot") -> None:
        super().__init__(message, retryable=True)


@dataclass
class SchedulerStats:
    """What the loop counted since it started (monotonic), and whether it is stalled now."""

    preemptions: int = 0  # running work paused for other work (it resumes later)
    reprefill_tokens: int = 0  # tokens prefilled again when paused work resumed
    refused_starts: int = 0  # starts the backend refused (requeued, never answered)
    disagreements: int = 0  # running work the backend no longer advanced (answered retryable)
    stalls: int = 0  # times open work made no progress for `stall_after_s`
    stalled_since: float | None = None  # monotonic time progress stopped, while stalled


class BackendLost(Exception):
    """The backend can no longer run anything in this process (e.g. a sticky CUDA error)."""


class Backend(Protocol):
    """Runs the jobs the scheduler starts, one step at a time.

    Called only from the scheduler's thread, except `encode_*`, `check_*` and `details`,
    which callers use from their own threads and must be thread-safe.
    """

    name: str
    model: str
    slots: int  # sequences it can run at once
    end_of_turn_id: int  # ends an assistant turn: scored after every label
    can_preempt: bool  # stop(job, preempted=True) keeps progress and start resumes it

    @property
    def step_capacity(self) -> int | None:
        """Tokens one step holds at most (llama.cpp: `n_batch`); None: no limit."""
        ...

    def encode_prompt(self, messages: tuple[ChatMessage, ...]) -> list[int]: ...

    def encode_text(self, text: str) -> list[int]: ...

    def check_generate(self, prompt_ids: list[int], request: GenerationRequest) -> None:
        """EngineError (not retryable) when this can never run here (too long)."""

    def check_score(self, prompt_ids: list[int], candidates: list[list[int]]) -> None: ...

    def free_slots(self) -> int:
        """How many more jobs it could start now (the policy plans no more than this, plus
        one per job the same plan preempts)."""
        ...

    def fits(self, job: Job, chosen: list[Job]) -> bool:
        """Whether the backend's shape limits let `job` start beside `chosen` (already picked
        for this step); the count of free slots is not its business."""
        ...

    def start(self, job: Job) -> None:
        """Take `job` into a free slot (resuming it when it was preempted); SlotUnavailable
        when there is none (the job goes back to the queue, unanswered)."""

    def live(self) -> int:
        """Started jobs the next step advances (not finished, not stopped)."""
        ...

    def wants(self) -> dict[Job, int]:
        """Tokens each started job asks to compute at the next step, in start order: the rest
        of its prompt (or of the label it scores), 1 while it generates. Called before every
        step; the policy's budget (`Policy.step_budget`) is decided from it."""
        ...

    def step(self, budget: Mapping[Job, int]) -> list[StepEvent]:
        """Advance every started job by one step: each computes the tokens `budget` gives it
        (a prompt chunk, or its next token), no more; a job it leaves out waits."""
        ...

    def stop(self, job: Job, *, preempted: bool = False) -> None:
        """Free `job`'s slot: it finished, was cancelled, or (`preempted`) will resume."""

    def details(self) -> dict[str, object]: ...

    def close(self) -> None: ...


FatalHandler = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class _Cancel:
    key: str
    answer: Deliver


@dataclass(frozen=True, slots=True)
class _Abandon:
    job: Job


_CLOSE = object()


class SchedulerLoop(threading.Thread):
    """The thread that owns a backend: builds it, then schedules and steps until closed.

    Every job handed to `submit` is answered exactly once (a result, or an EngineError) unless
    its caller abandoned it. A BackendLost from the backend ends the loop: everything open is
    answered retryable and `on_fatal` is called.
    """

    def __init__(
        self,
        make_backend: Callable[[], Backend],
        *,
        max_queued: int,
        output_weight: float = 2.0,
        fair_preemption: bool = True,
        step_tokens: int | None = None,
        on_fatal: FatalHandler | None = None,
        clock: Callable[[], float] = time.time,
        stall_after_s: float = 30.0,
        idle_wait_s: float = 0.5,
        name: str = "engine-scheduler",
    ) -> None:
        """`idle_wait_s`: how long one cycle waits for new work when there is nothing to do
        (a tenth of it when open work cannot move); tests that drive `cycle` pass 0.
        `step_tokens`: prompt and label tokens one step computes at most (the policy's
        per-step budget, see `Policy.step_budget`); None: as many as a step holds."""
        super().__init__(name=name, daemon=True)
        self.ready: concurrent.futures.Future[Backend] = concurrent.futures.Future()
        self.on_batch: BatchObserver | None = None
        self.on_fatal = on_fatal
        self.fatal_error: str | None = None
        self._make_backend = make_backend
        self._max_queued = max_queued
        self._output_weight = output_weight
        self._fair_preemption = fair_preemption
        self._step_tokens = step_tokens
        self._clock = clock
        self._inbox: queue.Queue[object] = queue.Queue()
        self._inbox_lock = threading.Lock()
        self._accepting = True
        self._policy: Policy | None = None
        self._load: Load | None = None
        self._open: set[Job] = set()  # admitted and not yet answered
        self._stall_after_s = stall_after_s
        self._idle_wait_s = idle_wait_s
        self._last_progress = time.monotonic()
        self.stats = SchedulerStats()

    # -- callers' side (any thread) -----------------------------------------------------

    def submit(self, job: Job) -> bool:
        """Hand `job` to the scheduler; False once it has stopped taking work."""
        with self._inbox_lock:
            if self._accepting:
                self._inbox.put(job)
            return self._accepting

    def cancel(self, key: str, answer: Deliver) -> bool:
        """Ask to cancel the work tagged `key`; `answer(bool)` says whether any was open."""
        with self._inbox_lock:
            if self._accepting:
                self._inbox.put(_Cancel(key, answer))
            return self._accepting

    def abandon(self, job: Job) -> None:
        """Its caller went away: drop `job` without answering it."""
        with self._inbox_lock:
            if self._accepting:
                self._inbox.put(_Abandon(job))

    def close(self) -> None:
        with self._inbox_lock:
            if self._accepting:
                self._inbox.put(_CLOSE)

    @property
    def load(self) -> Load:
        """The latest capacity snapshot (queued, running, slots)."""
        if self._load is not None:
            return self._load
        return Load({"interactive": 0, "batch": 0}, {"interactive": 0, "batch": 0}, 0, 0)

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        try:
            backend = self._make_backend()
        except BaseException as exc:
            self.ready.set_exception(exc)
            return
        policy = self.bind(backend)
        self.ready.set_result(backend)
        try:
            while self.cycle(backend, policy):
                pass
        except BackendLost as lost:
            self._die(str(lost))
        except Exception as exc:
            log.exception("scheduler_failed", extra={"open": len(self._open)})
            self._die(f"scheduler failed: {type(exc).__name__}: {exc}")
        finally:
            try:
                backend.close()
            except Exception:
                log.exception("backend_close_failed")

    def bind(self, backend: Backend) -> Policy:
        """The policy for `backend`'s slots (called once, by `run`, before the first cycle)."""
        policy = Policy(
            slots=backend.slots,
            max_queued=self._max_queued,
            can_preempt=backend.can_preempt,
            fair_preemption=self._fair_preemption,
            output_weight=self._output_weight,
            step_tokens=self._step_tokens,
        )
        self._policy = policy
        self._load = policy.load()
        return policy

    def cycle(self, backend: Backend, policy: Policy) -> bool:
        """One turn of the loop, in the order a person thinks: take new work and cancels,
        expire what waited too long, stop what the plan preempts and start what it starts,
        step the backend and apply what it did. False once closed (all open work answered).

        `run` calls it until then; tests drive it directly.
        """
        idle = not policy.running and policy.queued == 0
        took = self._take_inbox(backend, policy, wait_s=self._idle_wait_s if idle else 0.0)
        if took is None:
            self._stop_accepting(EngineError("engine is shutting down", retryable=True))
            return False
        progressed = took
        for work in policy.expire(self._clock()):
            job = work.payload
            self._answer(job, WorkExpired("the deadline passed while the request waited to run"))
            progressed = True
        progressed |= self._start_planned(backend, policy)
        self._load = policy.load()
        if policy.running:
            progressed |= self._step(backend, policy)
            self._load = policy.load()
        if progressed or (not policy.running and policy.queued == 0):
            self._progressed()
            return True
        # Nothing can move now (every slot held, nothing to step): wait for the inbox instead
        # of spinning, and report it if it lasts.
        self._no_progress(policy)
        if self._take_inbox(backend, policy, wait_s=self._idle_wait_s / 10) is None:
            self._stop_accepting(EngineError("engine is shutting down", retryable=True))
            return False
        return True

    def _step(self, backend: Backend, policy: Policy) -> bool:
        """One backend step; whether anything moved."""
        live = backend.live()
        self._report_batch(len(policy.running))
        try:
            wants = {job.work: n for job, n in backend.wants().items() if job.work is not None}
            budget = policy.step_budget(wants, backend.step_capacity)
            events = backend.step({work.payload: n for work, n in budget.items()})
        except BackendLost:
            raise
        except Exception as exc:
            log.exception("engine_step_failed", extra={"running": len(policy.running)})
            error = exc if isinstance(exc, EngineError) else None
            for work in policy.running:
                self._end_running(backend, policy, work, error or _step_error(exc))
            return True
        for event in events:
            self._apply(backend, policy, event)
        if events or live:
            return True
        # The policy has running work that the backend does not advance: they disagree. Free
        # the slots and answer retryably rather than step forever on nothing.
        self.stats.disagreements += len(policy.running)
        log.error(
            "scheduler_backend_disagree",
            extra={"running": len(policy.running), "backend_free": backend.free_slots()},
        )
        for work in policy.running:
            self._end_running(
                backend,
                policy,
                work,
                EngineError("the engine lost track of this request", retryable=True),
            )
        return True

    def _progressed(self) -> None:
        self._last_progress = time.monotonic()
        if self.stats.stalled_since is not None:
            log.warning(
                "engine_progress_resumed",
                extra={"stalled_s": round(time.monotonic() - self.stats.stalled_since, 3)},
            )
            self.stats.stalled_since = None

    def _no_progress(self, policy: Policy) -> None:
        if self.stats.stalled_since is not None:
            return
        if time.monotonic() - self._last_progress < self._stall_after_s:
            return
        self.stats.stalls += 1
        self.stats.stalled_since = self._last_progress
        log.error(
            "engine_stalled",
            extra={
                "queued": policy.queued,
                "running": len(policy.running),
                "no_progress_s": round(time.monotonic() - self._last_progress, 3),
            },
        )

    def _take_inbox(self, backend: Backend, policy: Policy, *, wait_s: float) -> bool | None:
        """Admit new jobs and apply cancels, in the order they came (waiting up to `wait_s`
        for the first); whether there were any; None once close() was called."""
        took = False
        try:
            item = self._inbox.get(timeout=wait_s) if wait_s > 0 else self._inbox.get_nowait()
            while True:
                if item is _CLOSE:
                    return None
                took = True
                if isinstance(item, Job):
                    self._admit(policy, item)
                elif isinstance(item, _Cancel):
                    item.answer(self._cancel(backend, policy, item.key))
                elif isinstance(item, _Abandon):
                    self._drop(backend, policy, item.job)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return took

    def _admit(self, policy: Policy, job: Job) -> None:
        work = Work(
            tenant=job.tag.tenant,
            priority=job.tag.priority,
            prompt_tokens=len(job.prompt_ids),
            max_tokens=job.max_tokens,
            deadline=job.tag.deadline,
            key=job.tag.key,
            payload=job,
        )
        try:
            policy.admit(work)
        except QueueFull as exc:
            job.deliver(EngineOverloaded(str(exc)))
            return
        job.work = work
        self._open.add(job)

    def _cancel(self, backend: Backend, policy: Policy, key: str) -> bool:
        found = policy.cancel(key)
        if found is None:
            return False
        work, was = found
        job: Job = work.payload
        if was == "running":
            self._halt(backend, job)
        self._answer(
            job,
            WorkCancelled(
                job.text, len(job.prompt_ids) if job.started_at else 0, job.output_tokens
            ),
        )
        log.info("work_cancelled", extra={"was": was, "output_tokens": job.output_tokens})
        return True

    def _drop(self, backend: Backend, policy: Policy, job: Job) -> None:
        if job not in self._open or job.work is None:
            return
        if policy.drop(job.work) == "running":
            self._halt(backend, job)
        self._open.discard(job)

    def _start_planned(self, backend: Backend, policy: Policy) -> bool:
        """Stop what the plan preempts, then start what it starts; whether it did anything."""

        def fits(work: Work, chosen: list[Work]) -> bool:
            return backend.fits(work.payload, [w.payload for w in chosen])

        plan = policy.schedule(backend.free_slots(), fits)
        for work in plan.preempt:
            self.stats.preemptions += 1
            self._halt(backend, work.payload, preempted=True)
        started = False
        for work in plan.start:
            job: Job = work.payload
            try:
                backend.start(job)
            except BackendLost:
                raise
            except SlotUnavailable as refused:
                # The policy counted a slot the backend does not have: the job waits for the
                # next one, unanswered (never `internal` for the scheduler's own mistake).
                policy.unstart(work)
                self.stats.refused_starts += 1
                log.warning(
                    "engine_start_refused",
                    extra={"kind": job.kind, "reason": str(refused), "free": backend.free_slots()},
                )
                continue
            except Exception as exc:
                log.exception("engine_start_failed", extra={"kind": job.kind})
                self._end_running(
                    backend, policy, work, exc if isinstance(exc, EngineError) else _step_error(exc)
                )
                continue
            started = True
            if work.preemptions:
                self.stats.reprefill_tokens += job.resumed_prefill
            if job.started_at is None:
                job.started_at = time.perf_counter()
        return started or bool(plan.preempt)

    def _apply(self, backend: Backend, policy: Policy, event: StepEvent) -> None:
        job = event.job
        work = job.work
        if work is None or job not in self._open:
            # Answered already (cancelled, failed): it must not hold its slot on.
            if event.result is not None or event.error is not None:
                self._halt(backend, job)
            return
        if event.new_tokens:
            policy.charge(work, event.new_tokens)
            job.output_tokens += event.new_tokens
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
        if event.text:
            job.text += event.text
            if job.on_text is not None:
                job.on_text(event.text)
        if event.error is not None:
            self._end_running(backend, policy, work, event.error)
        elif event.result is not None:
            self._end_running(backend, policy, work, self._finished(job, event.result))

    def _finished(self, job: Job, result: Generation | Scores) -> Generation | Scores:
        started = job.started_at or job.submitted_at
        queued_ms = round((started - job.submitted_at) * 1000, 3)
        if not isinstance(result, Generation):
            return replace(result, timings={**result.timings, "queued_ms": queued_ms})
        first = job.first_token_at
        return replace(
            result,
            # From the step that took it in (prefill and the first decode), as the metric and
            # the trace's prefill_ms say; the wait for a slot is `queued_ms`.
            first_token_ms=(first - started) * 1000 if first else result.first_token_ms,
            timings={**result.timings, "queued_ms": queued_ms},
        )

    def _end_running(self, backend: Backend, policy: Policy, work: Work, outcome: object) -> None:
        policy.finish(work)
        self._halt(backend, work.payload)
        self._answer(work.payload, outcome)

    def _halt(self, backend: Backend, job: Job, *, preempted: bool = False) -> None:
        try:
            backend.stop(job, preempted=preempted)
        except BackendLost:
            raise
        except Exception:
            # Its slot may stay dirty; the backend clears a slot again before reusing it.
            log.exception("engine_stop_failed", extra={"kind": job.kind})

    def _answer(self, job: Job, outcome: object) -> None:
        if job in self._open:
            self._open.discard(job)
            job.deliver(outcome)

    def _report_batch(self, size: int) -> None:
        observer = self.on_batch
        if observer is None:
            return
        try:
            observer(size)
        except Exception:
            log.exception("batch_observer_failed", extra={"size": size})

    # -- the end ------------------------------------------------------------------------

    def _stop_accepting(self, error: EngineError) -> None:
        """Take no more work; answer everything open or still in the inbox with `error`."""
        with self._inbox_lock:
            self._accepting = False
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                item.deliver(error)
            elif isinstance(item, _Cancel):
                item.answer(False)
        for job in list(self._open):
            self._answer(job, error)
        if self._policy is not None:
            self._load = Load(
                {"interactive": 0, "batch": 0},
                {"interactive": 0, "batch": 0},
                0,
                self._policy.slots,
                self._policy.max_queued,
            )

    def _die(self, reason: str) -> None:
        self.fatal_error = reason
        log.critical("engine_lost", extra={"reason": reason, "open": len(self._open)})
        try:
            if self.on_fatal is not None:
                self.on_fatal(reason)
        finally:
            self._stop_accepting(
                EngineError(f"engine lost ({reason}); this instance must restart", retryable=True)
            )


def _step_error(exc: BaseException) -> EngineError:
    if is_out_of_memory(exc):
        return EngineError("out of memory", retryable=True)
    return EngineError(f"engine step failed: {type(exc).__name__}", retryable=True)

"""ScheduledEngine: the asyncio `Engine` over a SchedulerLoop and the backend it drives."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from consumer.engine.base import (
    BatchObserver,
    ChatMessage,
    EngineError,
    EngineInfo,
    Generation,
    GenerationRequest,
    Load,
    Scores,
    TextObserver,
    WorkTag,
)
from consumer.engine.scheduler.driver import Backend, Job, SchedulerLoop


def _deliverer(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]
) -> Callable[[object], None]:
    """A thread-safe way for the scheduler thread to resolve `future` on its event loop."""

    def settle(outcome: object) -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def deliver(outcome: object) -> None:
        loop.call_soon_threadsafe(settle, outcome)

    return deliver


def _text_hop(loop: asyncio.AbstractEventLoop, observer: TextObserver) -> Callable[[str], None]:
    def forward(text: str) -> None:
        loop.call_soon_threadsafe(observer, text)

    return forward


class ScheduledEngine:
    """An `Engine` whose work is ordered by the scheduler and run by one backend.

    Build it with a started `SchedulerLoop` whose backend is ready (`loop.ready.result()`).
    """

    def __init__(self, scheduler: SchedulerLoop) -> None:
        self._scheduler = scheduler
        self._backend: Backend = scheduler.ready.result()
        self._closed = False
        self._callers: dict[asyncio.Task[Any], Job] = {}  # whose job is open, by caller

    # -- Engine -------------------------------------------------------------------------

    @property
    def on_batch(self) -> BatchObserver | None:
        """Told the number of running sequences at every step."""
        return self._scheduler.on_batch

    @on_batch.setter
    def on_batch(self, observer: BatchObserver | None) -> None:
        self._scheduler.on_batch = observer

    @property
    def fatal_error(self) -> str | None:
        """Why the backend can no longer run work in this process, or None while it can."""
        return self._scheduler.fatal_error

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def info(self) -> EngineInfo:
        load = self._scheduler.load
        stats = self._scheduler.stats
        stalled = stats.stalled_since
        details: dict[str, object] = {
            **self._backend.details(),
            "scheduler": {
                "slots": load.slots,
                "running": load.running,
                "queued_requests": dict(load.queued_requests),
                "queued_tokens": dict(load.queued_tokens),
                "preemptions": stats.preemptions,
                "reprefill_tokens": stats.reprefill_tokens,
                "refused_starts": stats.refused_starts,
                "disagreements": stats.disagreements,
                "stalls": stats.stalls,
                # Seconds since open work last made progress, while stalled (else None).
                "stalled_s": None if stalled is None else round(time.monotonic() - stalled, 1),
            },
        }
        fatal = self._scheduler.fatal_error
        if fatal is not None:
            details["error"] = f"engine lost: {fatal}"
        return EngineInfo(
            backend=self._backend.name,
            model=self._backend.model,
            loaded=not self._closed and self._scheduler.is_alive() and fatal is None,
            details=details,
        )

    def load(self) -> Load:
        return self._scheduler.load

    def queued_callers(self) -> set[asyncio.Task[Any]]:
        # `started_at` is set on the scheduler's thread; one read a moment stale only means a
        # job that just started is handed over too (its slot is freed when its task ends).
        return {task for task, job in self._callers.items() if job.started_at is None}

    def count_tokens(self, text: str) -> int:
        return len(self._backend.encode_text(text))

    async def generate(self, request: GenerationRequest) -> Generation:
        self._check_open()
        ids = self._backend.encode_prompt(request.messages)
        self._backend.check_generate(ids, request)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Generation] = loop.create_future()
        on_text = request.work.on_text
        job = Job(
            kind="generate",
            prompt_ids=ids,
            tag=request.work,
            deliver=_deliverer(loop, future),
            request=request,
            on_text=_text_hop(loop, on_text) if on_text is not None else None,
        )
        return await self._submit(job, future)

    async def score(
        self,
        messages: tuple[ChatMessage, ...],
        candidates: tuple[str, ...],
        work: WorkTag | None = None,
    ) -> Scores:
        self._check_open()
        if not candidates:
            raise EngineError("no candidates to score", retryable=False)
        ids = self._backend.encode_prompt(messages)
        # A label is scored as the complete reply: its tokens and then the end of the turn.
        end = self._backend.end_of_turn_id
        labels = [[*self._backend.encode_text(c), end] for c in candidates]
        self._backend.check_score(ids, labels)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Scores] = loop.create_future()
        job = Job(
            kind="score",
            prompt_ids=ids,
            tag=work or WorkTag(),
            deliver=_deliverer(loop, future),
            candidates=labels,
        )
        return await self._submit(job, future)

    async def cancel(self, key: str) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        if not self._scheduler.cancel(key, _deliverer(loop, future)):
            return False
        return await future

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._scheduler.close()
        await asyncio.to_thread(self._scheduler.join)

    # -- internals ----------------------------------------------------------------------

    async def _submit(self, job: Job, future: asyncio.Future[Any]) -> Any:
        if not self._scheduler.submit(job):
            self._check_open()
            raise EngineError("engine is not running", retryable=True)
        caller = asyncio.current_task()
        if caller is not None:
            self._callers[caller] = job
        try:
            return await future
        except asyncio.CancelledError:
            self._scheduler.abandon(job)
            raise
        finally:
            if caller is not None:
                self._callers.pop(caller, None)

    def _check_open(self) -> None:
        fatal = self._scheduler.fatal_error
        if fatal is not None:
            raise EngineError(f"engine lost ({fatal}); this instance must restart", retryable=True)
        if self._closed or not self._scheduler.is_alive():
            raise EngineError("engine is not running", retryable=True)


def start_scheduled_engine(
    make_backend: Callable[[], Backend],
    *,
    max_queued: int,
    output_weight: float = 2.0,
    fair_preemption: bool = True,
    step_tokens: int | None = None,
    on_fatal: Callable[[str], None] | None = None,
    stall_after_s: float = 30.0,
) -> ScheduledEngine:
    """Start the scheduler thread, build the backend on it and wait until it is ready
    (blocking: call it off the event loop). `step_tokens`: the prompt tokens one step
    computes at most (the scheduler's per-step budget; None: what a step holds)."""
    scheduler = SchedulerLoop(
        make_backend,
        max_queued=max_queued,
        output_weight=output_weight,
        fair_preemption=fair_preemption,
        step_tokens=step_tokens,
        on_fatal=on_fatal,
        stall_after_s=stall_after_s,
    )
    scheduler.start()
    scheduler.ready.result()
    return ScheduledEngine(scheduler)

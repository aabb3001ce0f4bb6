"""The scheduler loop and the asyncio engine over it, with a scripted backend (no model)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest

from consumer.engine.base import (
    ChatMessage,
    EngineError,
    EngineOverloaded,
    Generation,
    GenerationRequest,
    Scores,
    WorkCancelled,
    WorkExpired,
    WorkTag,
)
from consumer.engine.scheduler.driver import BackendLost, Job, StepEvent
from consumer.engine.scheduler.engine import ScheduledEngine, start_scheduled_engine
from tests.support.waiting import wait_until

QUESTION = (ChatMessage(role="user", content="hi"),)


class ScriptedBackend:
    """Generates one token ("w ") per step per running job; scores are -len(label)."""

    name = "scripted"
    model = "scripted-model"
    end_of_turn_id = 0
    step_capacity = None

    def __init__(self, slots: int = 2, *, can_preempt: bool = True) -> None:
        self.slots = slots
        self.can_preempt = can_preempt
        self.running: dict[Job, int] = {}
        self.log: list[tuple[str, str]] = []  # (event, job label)
        self.steps = 0
        self.step_s = 0.002  # a step takes time, as a model's does
        self.fail_next_step: BaseException | None = None
        self.gate = threading.Event()  # clear: steps make no progress
        self.gate.set()

    def encode_prompt(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        return [1] * sum(len(m.content) for m in messages)

    def encode_text(self, text: str) -> list[int]:
        return [2] * len(text)

    def check_generate(self, prompt_ids: list[int], request: GenerationRequest) -> None:
        if len(prompt_ids) + request.max_tokens > 1000:
            raise EngineError("too long", retryable=False)

    def check_score(self, prompt_ids: list[int], candidates: list[list[int]]) -> None:
        pass

    def free_slots(self) -> int:
        return self.slots - len(self.running)

    def fits(self, job: Job, chosen: list[Job]) -> bool:
        return True

    def live(self) -> int:
        return len(self.running)

    def wants(self) -> dict[Job, int]:
        return dict.fromkeys(self.running, 1)

    def start(self, job: Job) -> None:
        done = job.backend_state or 0
        self.running[job] = done
        self.log.append(("resume" if done else "start", label(job)))

    def stop(self, job: Job, *, preempted: bool = False) -> None:
        done = self.running.pop(job)
        if preempted:
            job.backend_state = done
        self.log.append(("preempt" if preempted else "stop", label(job)))

    def step(self, budget: Mapping[Job, int]) -> list[StepEvent]:
        time.sleep(self.step_s)
        if not self.gate.is_set():
            return []  # held: the step makes no progress
        self.steps += 1
        if self.fail_next_step is not None:
            failure, self.fail_next_step = self.fail_next_step, None
            raise failure
        events = []
        for job in list(self.running):
            if job.kind == "score":
                scores = tuple(-float(len(c)) for c in job.candidates)
                events.append(StepEvent(job, result=Scores(scores, len(job.prompt_ids), 0)))
                continue
            self.running[job] += 1
            done = self.running[job]
            assert job.request is not None
            event = StepEvent(job, new_tokens=1, text="w ")
            if done >= job.request.max_tokens:
                event.result = Generation(
                    text="w " * done,
                    finish_reason="length",
                    input_tokens=len(job.prompt_ids),
                    output_tokens=done,
                )
            events.append(event)
        return events

    def details(self) -> dict[str, object]:
        return {"device": "none"}

    def close(self) -> None:
        self.log.append(("close", ""))


def label(job: Job) -> str:
    return job.tag.key or "?"


def request(max_tokens: int = 3, **tag: Any) -> GenerationRequest:
    return GenerationRequest(messages=QUESTION, max_tokens=max_tokens, work=WorkTag(**tag))


@pytest.fixture
async def make_engine() -> AsyncIterator[Callable[..., Any]]:
    made: list[ScheduledEngine] = []

    async def make(backend: ScriptedBackend, **kw: Any) -> ScheduledEngine:
        engine = await asyncio.to_thread(
            start_scheduled_engine, lambda: backend, max_queued=kw.pop("max_queued", 32), **kw
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await engine.close()


async def test_generate_answers_with_first_token_and_queue_times(make_engine: Any) -> None:
    backend = ScriptedBackend()
    engine = await make_engine(backend)
    started = time.perf_counter()
    generation = await engine.generate(request(max_tokens=3, key="t/1"))
    total_ms = (time.perf_counter() - started) * 1000
    assert generation.text == "w w w "
    assert generation.output_tokens == 3
    # The first token took at least its step; waiting plus first token fit in the call.
    first_token_ms = generation.first_token_ms
    assert first_token_ms is not None
    assert backend.step_s * 1000 <= first_token_ms <= total_ms
    queued_ms = generation.timings["queued_ms"]
    assert isinstance(queued_ms, float) and 0 <= queued_ms < total_ms
    assert queued_ms + first_token_ms <= total_ms


async def test_streamed_text_arrives_in_order_on_the_callers_loop(make_engine: Any) -> None:
    engine = await make_engine(ScriptedBackend())
    pieces: list[str] = []
    loop_thread = threading.get_ident()
    threads: set[int] = set()

    def on_text(text: str) -> None:
        pieces.append(text)
        threads.add(threading.get_ident())

    generation = await engine.generate(request(max_tokens=4, on_text=on_text))
    await asyncio.sleep(0)  # let the last hop run
    assert "".join(pieces) == generation.text
    assert threads == {loop_thread}


async def test_cancel_stops_a_running_job_and_its_slot_goes_to_the_next(make_engine: Any) -> None:
    backend = ScriptedBackend(slots=1)
    engine = await make_engine(backend)
    long = asyncio.create_task(engine.generate(request(max_tokens=900, key="t/long")))
    await wait_until(lambda: ("start", "t/long") in backend.log and backend.steps >= 3)
    queued = asyncio.create_task(engine.generate(request(max_tokens=2, key="t/next")))
    await wait_until(lambda: engine.load().queued_requests["interactive"] == 1)
    assert await engine.cancel("t/long") is True
    with pytest.raises(WorkCancelled) as cancelled:
        await long
    assert cancelled.value.output_tokens >= 3
    assert cancelled.value.text == "w " * cancelled.value.output_tokens
    assert cancelled.value.input_tokens == 2
    assert (await queued).output_tokens == 2
    stop_at = backend.log.index(("stop", "t/long"))
    assert backend.log[stop_at + 1] == ("start", "t/next")
    assert await engine.cancel("t/long") is False  # already ended: harmless


async def test_cancel_removes_queued_work_before_it_runs(make_engine: Any) -> None:
    backend = ScriptedBackend(slots=1)
    engine = await make_engine(backend)
    backend.gate.clear()
    first = asyncio.create_task(engine.generate(request(max_tokens=2, key="t/1")))
    second = asyncio.create_task(engine.generate(request(max_tokens=2, key="t/2")))
    await wait_until(lambda: engine.load().queued_requests["interactive"] == 1)
    assert await engine.cancel("t/2") is True
    backend.gate.set()
    with pytest.raises(WorkCancelled) as cancelled:
        await second
    assert (cancelled.value.input_tokens, cancelled.value.output_tokens) == (0, 0)
    assert (await first).output_tokens == 2
    assert ("start", "t/2") not in backend.log


async def test_work_whose_deadline_passes_in_the_queue_never_runs(make_engine: Any) -> None:
    backend = ScriptedBackend(slots=1)
    engine = await make_engine(backend)
    backend.gate.clear()
    first = asyncio.create_task(engine.generate(request(max_tokens=2, key="t/1")))
    late = asyncio.create_task(
        engine.generate(request(max_tokens=2, key="t/late", deadline=time.time() + 0.2))
    )
    await asyncio.sleep(0.3)
    backend.gate.set()
    with pytest.raises(WorkExpired):
        await late
    await first
    assert ("start", "t/late") not in backend.log


async def test_a_full_queue_answers_overloaded(make_engine: Any) -> None:
    backend = ScriptedBackend(slots=1)
    engine = await make_engine(backend, max_queued=1)
    backend.gate.clear()
    running = asyncio.create_task(engine.generate(request(key="t/1")))
    await wait_until(lambda: engine.load().running == 1)
    queued = asyncio.create_task(engine.generate(request(key="t/2")))
    await wait_until(lambda: engine.load().queued_requests["interactive"] == 1)
    with pytest.raises(EngineOverloaded):
        await engine.generate(request(key="t/3"))
    backend.gate.set()
    await asyncio.gather(running, queued)


async def test_a_caller_that_goes_away_frees_its_slot(make_engine: Any) -> None:
    backend = ScriptedBackend(slots=1)
    engine = await make_engine(backend)
    gone = asyncio.create_task(engine.generate(request(max_tokens=900, key="t/gone")))
    await wait_until(lambda: ("start", "t/gone") in backend.log)
    gone.cancel()
    assert (await engine.generate(request(max_tokens=1, key="t/after"))).output_tokens == 1
    assert backend.log.index(("stop", "t/gone")) < backend.log.index(("start", "t/after"))


async def test_interactive_work_preempts_batch_work_which_then_resumes(make_engine: Any) -> None:
    backend = ScriptedBackend(slots=1)
    engine = await make_engine(backend)
    batch = asyncio.create_task(engine.generate(request(max_tokens=40, key="b", priority="batch")))
    await wait_until(lambda: backend.steps >= 2)
    steps_before = backend.steps
    urgent = await engine.generate(request(max_tokens=2, key="i"))
    assert urgent.output_tokens == 2
    finished = await batch
    assert finished.output_tokens == 40  # resumed where it stopped, nothing lost or repeated
    assert backend.log[:4] == [("start", "b"), ("preempt", "b"), ("start", "i"), ("stop", "i")]
    assert ("resume", "b") in backend.log
    # The interactive request waited at most the step in progress.
    assert backend.log.index(("start", "i")) == 2
    assert steps_before >= 2


async def test_a_failed_step_fails_its_jobs_and_the_loop_serves_on(make_engine: Any) -> None:
    backend = ScriptedBackend(slots=2)
    engine = await make_engine(backend)
    backend.fail_next_step = RuntimeError("boom")
    with pytest.raises(EngineError) as failed:
        await engine.generate(request(key="t/1"))
    assert failed.value.retryable
    assert (await engine.generate(request(max_tokens=1, key="t/2"))).output_tokens == 1


async def test_a_lost_backend_answers_everything_and_calls_on_fatal(make_engine: Any) -> None:
    backend = ScriptedBackend(slots=1)
    reasons: list[str] = []
    engine = await make_engine(backend, on_fatal=reasons.append)
    backend.gate.clear()
    tasks = [asyncio.create_task(engine.generate(request(key=f"t/{i}"))) for i in range(3)]
    await wait_until(lambda: engine.load().queued_requests["interactive"] == 2)
    backend.fail_next_step = BackendLost("device gone")
    backend.gate.set()
    for task in tasks:
        with pytest.raises(EngineError) as lost:
            await task
        assert lost.value.retryable
    assert reasons == ["device gone"]
    assert engine.fatal_error == "device gone"
    assert engine.info.loaded is False
    with pytest.raises(EngineError):
        await engine.generate(request(key="t/after"))


async def test_scores_go_through_the_scheduler(make_engine: Any) -> None:
    engine = await make_engine(ScriptedBackend())
    scores = await engine.score(QUESTION, ("yes", "maybe"), WorkTag(tenant="t"))
    assert scores.logprobs == (-4.0, -6.0)  # each label + the end-of-turn token


async def test_load_and_info_report_the_scheduler(make_engine: Any) -> None:
    backend = ScriptedBackend(slots=1)
    engine = await make_engine(backend)
    backend.gate.clear()
    tasks = [
        asyncio.create_task(engine.generate(request(max_tokens=4, key="a", tenant="x"))),
        asyncio.create_task(engine.generate(request(max_tokens=5, key="b", priority="batch"))),
    ]
    await wait_until(lambda: engine.load().running == 1)
    await wait_until(lambda: engine.load().queued_requests["batch"] == 1)
    load = engine.load()
    assert load.queued_tokens["batch"] == 2 + 5
    assert engine.info.details["scheduler"]["slots"] == 1  # type: ignore[index]
    backend.gate.set()
    await asyncio.gather(*tasks)


async def test_a_burst_of_slots_plus_queue_is_admitted_whole(make_engine: Any) -> None:
    """What the intake may hand over at once (its bound is slots + queue) never overflows,
    even when it all reaches the scheduler before a step starts any of it."""
    backend = ScriptedBackend(slots=2)
    engine = await make_engine(backend, max_queued=3)
    backend.gate.clear()
    burst = [asyncio.create_task(engine.generate(request(key=f"t/{i}"))) for i in range(5)]
    await wait_until(lambda: engine.load().running == 2)
    backend.gate.set()
    assert all(g.output_tokens == 3 for g in await asyncio.gather(*burst))


async def test_first_token_time_counts_from_the_start_not_from_the_queue(make_engine: Any) -> None:
    backend = ScriptedBackend(slots=1)
    backend.step_s = 0.01
    engine = await make_engine(backend)
    first = asyncio.create_task(engine.generate(request(max_tokens=20, key="t/1")))
    await wait_until(lambda: engine.load().running == 1)
    second = await engine.generate(request(max_tokens=1, key="t/2"))
    await first
    assert second.timings["queued_ms"] >= 100  # it waited for the first one's slot
    assert second.first_token_ms is not None and second.first_token_ms < 50  # one step


class LeakyBackend(ScriptedBackend):
    """Slots held by something the scheduler never started: it can start nothing."""

    def free_slots(self) -> int:
        return 0


class ForgetfulBackend(ScriptedBackend):
    """Accepts a start and then does not run it (live 0): the policy and it disagree."""

    def start(self, job: Job) -> None:
        self.log.append(("start", label(job)))

    def live(self) -> int:
        return 0


async def test_work_that_cannot_start_stalls_without_spinning_and_is_reported(
    make_engine: Any,
) -> None:
    backend = LeakyBackend(slots=2)
    engine = await make_engine(backend, stall_after_s=0.3)
    waiting = asyncio.create_task(engine.generate(request(key="t/1")))
    await wait_until(lambda: engine.info.details["scheduler"]["stalled_s"] is not None)
    scheduler = engine.info.details["scheduler"]
    assert scheduler["stalls"] == 1 and scheduler["queued_requests"]["interactive"] == 1
    assert backend.steps == 0  # nothing to step: the loop waited instead of spinning
    # Closing a stalled engine ends at once and answers what waited, retryably.
    started = time.perf_counter()
    await engine.close()
    assert time.perf_counter() - started < 2.0
    with pytest.raises(EngineError) as ended:
        await waiting
    assert ended.value.retryable


async def test_running_work_the_backend_does_not_advance_is_answered_not_stepped_forever(
    make_engine: Any,
) -> None:
    backend = ForgetfulBackend(slots=2)
    engine = await make_engine(backend)
    with pytest.raises(EngineError) as lost:
        await asyncio.wait_for(engine.generate(request(key="t/1")), 5)
    assert lost.value.retryable and "lost track" in str(lost.value)
    assert backend.steps <= 1
    assert engine.info.details["scheduler"]["disagreements"] == 1
    # The slot is the policy's again: later work is planned (and answered) too.
    with pytest.raises(EngineError):
        await asyncio.wait_for(engine.generate(request(key="t/2")), 5)
    # (The load snapshot follows the answer by a moment: the scheduler thread writes it.)
    await wait_until(lambda: engine.load().running == 0)


class PrefillingBackend(ScriptedBackend):
    """Each job first computes its prompt (2 tokens per character) as the budget allows, then
    generates; records every step's budget."""

    step_capacity = 24

    def __init__(self, slots: int = 2) -> None:
        super().__init__(slots)
        self.prompt_left: dict[Job, int] = {}
        self.budgets: list[dict[str, int]] = []

    def start(self, job: Job) -> None:
        super().start(job)
        self.prompt_left[job] = 2 * len(job.prompt_ids)

    def wants(self) -> dict[Job, int]:
        return {job: self.prompt_left.get(job) or 1 for job in self.running}

    def step(self, budget: Mapping[Job, int]) -> list[StepEvent]:
        self.budgets.append({label(job): n for job, n in budget.items()})
        prefilling = {job for job in self.running if self.prompt_left.get(job)}
        for job in prefilling:
            self.prompt_left[job] -= budget.get(job, 0)
        generating = {job: n for job, n in self.running.items() if job not in prefilling}
        held = {job: self.running.pop(job) for job in prefilling}
        try:
            return super().step(budget) if generating else []
        finally:
            self.running.update(held)


async def test_the_scheduler_sets_each_steps_prompt_budget_and_the_backend_keeps_to_it(
    make_engine: Any,
) -> None:
    """`step_tokens` bounds the prompt tokens of every step (generating jobs get their one
    token besides), within what one step of the backend holds."""
    backend = PrefillingBackend(slots=2)
    engine = await make_engine(backend, step_tokens=16)
    long = GenerationRequest(
        messages=(ChatMessage("user", "x" * 20),), max_tokens=3, work=WorkTag(key="t/long")
    )
    short = asyncio.create_task(engine.generate(request(max_tokens=30, key="t/short")))
    await wait_until(lambda: any(b.get("t/short") == 1 for b in backend.budgets))
    generation = await engine.generate(long)
    await short
    assert generation.output_tokens == 3
    prompt_steps = [b for b in backend.budgets if b.get("t/long", 0) > 1]
    # 40 prompt tokens at most 16 a step: 16, 16, 8, each beside the short job's token.
    assert [b["t/long"] for b in prompt_steps] == [16, 16, 8]
    assert all(b.get("t/short") == 1 for b in prompt_steps)
    assert all(sum(b.values()) <= backend.step_capacity for b in backend.budgets)

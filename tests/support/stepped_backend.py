"""A model-free backend for the real scheduler: `slots` sequences, one token per running
sequence per step of `step_s` seconds, so flow control meets a real queue, real slots and
real deadlines without a model (tests and `consumer_main --stepped`)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from consumer.engine.base import ChatMessage, Generation, GenerationRequest, Scores
from consumer.engine.factory import queue_limit
from consumer.engine.scheduler.driver import Job, StepEvent
from consumer.engine.scheduler.engine import ScheduledEngine, start_scheduled_engine
from consumer.settings import Settings


class SteppedBackend:
    """Generates `tokens` tokens ("w ") per request (fewer if max_tokens says so); scores
    take one step. Thread-confined to the scheduler like every backend."""

    name = "stepped"
    model = "stepped-model"
    end_of_turn_id = 0
    can_preempt = True
    step_capacity = None

    def __init__(self, slots: int = 4, step_s: float = 0.05, tokens: int = 8) -> None:
        self.slots = slots
        self.step_s = step_s
        self.tokens = tokens
        self.running: dict[Job, int] = {}

    def encode_prompt(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        return [1] * sum(len(m.content.split()) + 4 for m in messages)

    def encode_text(self, text: str) -> list[int]:
        return [2] * len(text.split())

    def check_generate(self, prompt_ids: list[int], request: GenerationRequest) -> None:
        pass

    def check_score(self, prompt_ids: list[int], candidates: list[list[int]]) -> None:
        pass

    def free_slots(self) -> int:
        return self.slots - len(self.running)

    def fits(self, job: Job, chosen: list[Job]) -> bool:
        return True

    def start(self, job: Job) -> None:
        self.running[job] = job.backend_state or 0

    def live(self) -> int:
        return len(self.running)

    def wants(self) -> dict[Job, int]:
        return dict.fromkeys(self.running, 1)

    def step(self, budget: Mapping[Job, int]) -> list[StepEvent]:
        time.sleep(self.step_s)
        events = []
        for job in list(self.running):
            if job.kind == "score":
                scores = tuple(-float(len(c)) for c in job.candidates)
                events.append(StepEvent(job, result=Scores(scores, len(job.prompt_ids), 0)))
                continue
            assert job.request is not None
            self.running[job] += 1
            done = self.running[job]
            event = StepEvent(job, new_tokens=1, text="w ")
            if done >= min(self.tokens, job.request.max_tokens):
                event.result = Generation(
                    text="w " * done,
                    finish_reason="length",
                    input_tokens=len(job.prompt_ids),
                    output_tokens=done,
                )
            events.append(event)
        return events

    def stop(self, job: Job, *, preempted: bool = False) -> None:
        done = self.running.pop(job, 0)
        if preempted:
            job.backend_state = done

    def details(self) -> dict[str, object]:
        return {"device": "none"}

    def close(self) -> None:
        self.running.clear()


def start_stepped_engine(
    settings: Settings, *, slots: int, step_s: float, tokens: int
) -> ScheduledEngine:
    """The real scheduler over a SteppedBackend, its queue sized as the settings say
    (`engine.scheduler.max_queued`, default 16x the slots, at least 64)."""
    scheduler = settings.engine.scheduler
    return start_scheduled_engine(
        lambda: SteppedBackend(slots, step_s, tokens),
        max_queued=queue_limit(settings, slots),
        output_weight=scheduler.output_weight,
        fair_preemption=scheduler.fair_preemption,
    )

"""A zero-cost engine for tests of the plumbing (and the pipeline-overhead benchmark)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from consumer.engine.base import (
    BatchObserver,
    ChatMessage,
    EngineError,
    EngineInfo,
    Generation,
    GenerationRequest,
    Scores,
    WorkCancelled,
    WorkTag,
)
from consumer.engine.scheduler.policy import Load


class FakeEngine:
    """Answers instantly (or after `delay_s`) with text derived from the prompt's size.

    A message containing `fail_marker` makes `generate` raise a retryable EngineError.
    """

    def __init__(self, delay_s: float = 0.0, fail_marker: str = "__engine_failure__") -> None:
        self.delay_s = delay_s
        self.fail_marker = fail_marker
        self.calls = 0
        self.works: list[WorkTag] = []  # how each call was tagged for the scheduler
        self.raise_next: EngineError | None = None  # raised by the next call instead
        # Set: generation pauses after its first word until released (or cancelled).
        self.hold: asyncio.Event | None = None
        self._running: set[str] = set()
        self._cancelled: set[str] = set()
        self.on_batch: BatchObserver | None = None
        self._info = EngineInfo(backend="fake", model="fake-model", loaded=True)

    @property
    def info(self) -> EngineInfo:
        return self._info

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def load(self) -> Load:
        idle = {"interactive": 0, "batch": 0}
        # It runs any number of calls at once: 32 "slots" and no queue.
        return Load(dict(idle), dict(idle), running=0, slots=32, queue_limit=0)

    def queued_callers(self) -> set[asyncio.Task[Any]]:
        return set()  # every call runs at once: nothing waits for a slot

    async def cancel(self, key: str) -> bool:
        if key not in self._running:
            return False
        self._cancelled.add(key)
        if self.hold is not None:
            self.hold.set()
        return True

    def _called(self, work: WorkTag) -> None:
        self.calls += 1
        self.works.append(work)
        if self.raise_next is not None:
            error, self.raise_next = self.raise_next, None
            raise error

    async def generate(self, request: GenerationRequest) -> Generation:
        self._called(request.work)
        if self.on_batch is not None:
            self.on_batch(1)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if any(self.fail_marker in m.content for m in request.messages):
            raise EngineError("the fake engine was asked to fail", retryable=True)
        prompt_tokens = sum(self.count_tokens(m.content) for m in request.messages)
        words = ["word"] * max(1, min(request.max_tokens, 8))
        key = request.work.key or ""
        self._running.add(key)
        try:
            for i in range(len(words)):
                # One word per step, streamed to the caller like a real engine's tokens.
                if request.work.on_text is not None:
                    request.work.on_text(("" if i == 0 else " ") + words[i])
                if i == 0 and self.hold is not None:
                    await self.hold.wait()
                await asyncio.sleep(0)
                if key in self._cancelled:
                    self._cancelled.discard(key)
                    raise WorkCancelled(" ".join(words[: i + 1]), prompt_tokens, i + 1)
        finally:
            self._running.discard(key)
        text = " ".join(words) + "."
        if request.work.on_text is not None:
            request.work.on_text(".")
        return Generation(
            text=text,
            input_tokens=prompt_tokens,
            output_tokens=len(words),
            finish_reason="stop",
            first_token_ms=0.0,
        )

    async def score(
        self,
        messages: tuple[ChatMessage, ...],
        candidates: tuple[str, ...],
        work: WorkTag | None = None,
    ) -> Scores:
        self._called(work or WorkTag())
        if self.on_batch is not None:
            self.on_batch(1)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        logprobs = tuple(-math.log(i + 2) for i in range(len(candidates)))
        prompt_tokens = sum(self.count_tokens(m.content) for m in messages)
        return Scores(logprobs=logprobs, input_tokens=prompt_tokens, scored_tokens=len(candidates))

    async def close(self) -> None:
        return None

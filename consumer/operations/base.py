"""What every operation provides: its prompt, its output budget and how it is served (pure
except `serve`, which calls the engine)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from consumer.engine.base import ChatMessage, Engine, Generation, GenerationRequest, WorkTag
from consumer.settings import OperationLimits
from schemas.replies import (
    ChatResult,
    ClassifyResult,
    ExtractResult,
    SummarizeResult,
    TranslateResult,
)
from schemas.requests import (
    OPERATION_LIMITS,
    ChatRequest,
    ClassifyRequest,
    ExtractRequest,
    SummarizeRequest,
    TranslateRequest,
)

AnyRequest = SummarizeRequest | TranslateRequest | ClassifyRequest | ChatRequest | ExtractRequest
Result = SummarizeResult | TranslateResult | ClassifyResult | ChatResult | ExtractResult


@dataclass(frozen=True, slots=True)
class Prompt:
    """What the engine is asked: a generation, or messages and candidates to score."""

    messages: tuple[ChatMessage, ...]
    max_tokens: int
    generation: GenerationRequest | None = None
    candidates: tuple[str, ...] = ()
    work: WorkTag = field(default_factory=WorkTag)

    def tagged(self, work: WorkTag) -> Prompt:
        """This prompt as `work` (tenant, priority, deadline, cancel key) for the scheduler."""
        generation = None if self.generation is None else replace(self.generation, work=work)
        return replace(self, generation=generation, work=work)


@dataclass(frozen=True, slots=True)
class Served:
    """An operation's result and what producing it cost."""

    result: Result
    input_tokens: int
    output_tokens: int
    execution_ms: float  # handed to the engine → its answer (slot wait included)
    first_token_ms: float | None
    # The scheduler's own measures (`queued_ms`: the wait for a slot), see `Stages`.
    timings: dict[str, float] = field(default_factory=dict)


class Operation(Protocol):
    """One operation of the contract (`summarize`, `translate`, `classify`, `chat`,
    `extract`); its methods take that operation's request model."""

    name: str

    def prompt(self, request: Any, limits: OperationLimits) -> Prompt:
        """The prompt for `request` (pure; may raise ValidationFailed)."""
        ...

    async def serve(self, engine: Engine, request: Any, prompt: Prompt) -> Served:
        """Run `prompt` on `engine` and shape the result."""
        ...


def output_budget(
    operation: str, default: int, requested: int | None, configured_cap: int | None = None
) -> int:
    """Tokens the engine may generate: the request's max_tokens within the operation's cap."""
    cap = configured_cap or OPERATION_LIMITS[operation].max_output_tokens
    return min(requested or default, cap)


async def generate(engine: Engine, prompt: Prompt, shape: Callable[[Generation], Result]) -> Served:
    """Run a generating prompt and shape its text into the operation's result."""
    assert prompt.generation is not None
    started = time.perf_counter()
    generation = await engine.generate(prompt.generation)
    result = shape(generation)
    return Served(
        result=result,
        input_tokens=generation.input_tokens,
        output_tokens=generation.output_tokens,
        execution_ms=(time.perf_counter() - started) * 1000,
        first_token_ms=generation.first_token_ms,
        timings=generation.timings,
    )


_PREAMBLE = re.compile(
    r"^(summary|translation|here is[^:\n]{0,60}|here's[^:\n]{0,60}):\s*", re.IGNORECASE
)


def strip_preamble(output: str) -> str:
    """The model's answer without an announcement ("Summary: ...", "Here is ...: ...")."""
    text = output.strip()
    match = _PREAMBLE.match(text)
    return text[match.end() :] if match else text

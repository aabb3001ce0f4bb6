"""The one narrow interface every model backend implements."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from consumer.engine.grammar.constraint import JsonConstraint

Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")
Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]
# Told the number of requests in each batch the engine runs; must be cheap and never raise.
BatchObserver = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a conversation, as the model's chat template receives it."""

    role: Role
    content: str


# Told each piece of new text as it is generated, on the caller's event loop; cheap, never raises.
TextObserver = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class WorkTag:
    """Who asked and how urgent it is: what the scheduler orders and cancels work by."""

    tenant: str = ""
    priority: Priority = "interactive"
    deadline: float | None = None  # unix seconds; still queued then -> WorkExpired, never run
    key: str | None = None  # what `Engine.cancel` finds this work by (tenant + request id)
    on_text: TextObserver | None = None  # streamed text deltas (generate only)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What to generate: a conversation rendered with the model's own chat template."""

    messages: tuple[ChatMessage, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    work: WorkTag = field(default_factory=WorkTag)
    # The output must be JSON following it (constrained decoding, consumer.engine.grammar);
    # generation ends when the JSON is complete.
    constraint: JsonConstraint | None = None


@dataclass(frozen=True, slots=True)
class Generation:
    """What came back: the assistant's text and real token counts."""

    text: str
    finish_reason: FinishReason
    input_tokens: int
    output_tokens: int
    first_token_ms: float | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Scores:
    """Log-likelihoods of candidate assistant replies to one prompt."""

    logprobs: tuple[float, ...]
    input_tokens: int
    scored_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What health reporting and reply metadata say about a loaded engine."""

    backend: str
    model: str
    loaded: bool
    details: dict[str, object] = field(default_factory=dict)


class RequestState(enum.Enum):
    """Where one request stands inside a backend (llama.cpp server's slot states): set where
    it changes, never inferred from counters.

    A request starts `PREFILLING` (its prompt, or what a resumed one must compute again, goes
    into the cache), then `GENERATING` (one token per step) or `SCORING` (label tokens after
    the prompt), and ends `DONE` (answered; its slot frees when the scheduler stops it).
    `PAUSED`: preempted with its progress kept and no slot; it resumes `PREFILLING`.
    """

    PREFILLING = "prefilling"
    GENERATING = "generating"
    SCORING = "scoring"
    PAUSED = "paused"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Load:
    """The capacity signals: what is queued (requests, tokens) per priority and what runs."""

    queued_requests: dict[Priority, int]
    queued_tokens: dict[Priority, int]
    running: int
    slots: int
    queue_limit: int = 0  # requests the queue takes before refusing (QueueFull)

    @property
    def occupancy(self) -> float:
        return self.running / self.slots if self.slots else 0.0


class EngineError(Exception):
    """A backend failed to run a request; `retryable` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, says the device ran out of memory
    (CUDA's "out of memory", a host MemoryError): the one test every backend uses. Such a
    failure costs the batch it hit, not the engine; trying again later may fit."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError) or "out of memory" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


class EngineOverloaded(EngineError):
    """The scheduler's queue is full; nothing ran."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


class WorkExpired(EngineError):
    """The work's deadline passed while it waited in the queue; it never ran."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class WorkCancelled(EngineError):
    """The work was cancelled (`Engine.cancel`); what it had generated until then."""

    def __init__(self, text: str, input_tokens: int, output_tokens: int) -> None:
        super().__init__("cancelled", retryable=False)
        self.text = text
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens


@runtime_checkable
class Engine(Protocol):
    """A loaded model that generates, scores and counts tokens.

    Implementations accept many concurrent calls; one scheduler (`consumer.engine.scheduler`)
    decides what runs, the backend runs it.
    """

    # None until the app sets it; the backend calls it, from its own worker thread, with the
    # number of requests in each batch it runs (llama.cpp: 1 per call, one at a time).
    on_batch: BatchObserver | None

    @property
    def info(self) -> EngineInfo: ...

    async def generate(self, request: GenerationRequest) -> Generation:
        """Generate the assistant's reply to `request.messages`."""
        ...

    async def score(
        self,
        messages: tuple[ChatMessage, ...],
        candidates: tuple[str, ...],
        work: WorkTag | None = None,
    ) -> Scores:
        """Log-likelihood of each candidate as the *complete* assistant reply.

        A candidate's score is the sum of the log-probabilities of its tokens
        followed by the model's end-of-turn token, conditioned on the prompt
        rendered with the chat template and its generation prompt. Including
        the end-of-turn token keeps a label that is a prefix of another
        ("pos" / "positive") from winning for free.
        """
        ...

    def count_tokens(self, text: str) -> int:
        """Number of tokens `text` encodes to (no special tokens added)."""
        ...

    async def cancel(self, key: str) -> bool:
        """Cancel the work tagged `key`: a queued one never runs, a running one stops at the
        next step. Its caller gets WorkCancelled. False when no such work is open."""
        ...

    def load(self) -> Load:
        """Queued requests and tokens per priority, running sequences and slots."""
        ...

    def queued_callers(self) -> set[asyncio.Task[Any]]:
        """The tasks waiting on work that has not started yet (none of its tokens computed):
        what a revoke or shutdown can hand to the next owner at no cost (cancel the task)."""
        ...

    async def close(self) -> None:
        """Release the model and any worker threads."""
        ...

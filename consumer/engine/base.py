"""The one narrow interface every model backend implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]
# Told the number of requests in each batch the engine runs; must be cheap and never raise.
BatchObserver = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a conversation, as the model's chat template receives it."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What to generate: a conversation rendered with the model's own chat template."""

    messages: tuple[ChatMessage, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


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


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What health reporting and reply metadata say about a loaded engine."""

    backend: str
    model: str
    loaded: bool
    details: dict[str, object] = field(default_factory=dict)


class EngineError(Exception):
    """A backend failed to run a request; `retryable` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@runtime_checkable
class Engine(Protocol):
    """A loaded model that generates, scores and counts tokens.

    Implementations accept many concurrent calls and schedule them themselves
    (a lock around a single context on the CPU, a batcher on the GPU).
    """

    # None until the app sets it; the backend calls it, from its own worker thread, with the
    # number of requests in each batch it runs (llama.cpp: 1 per call, one at a time).
    on_batch: BatchObserver | None

    @property
    def info(self) -> EngineInfo: ...

    async def generate(self, request: GenerationRequest) -> Generation:
        """Generate the assistant's reply to `request.messages`."""
        ...

    async def score(self, messages: tuple[ChatMessage, ...], candidates: tuple[str, ...]) -> Scores:
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

    async def close(self) -> None:
        """Release the model and any worker threads."""
        ...

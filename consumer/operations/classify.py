"""classify: every category scored by the model's likelihood of it as the answer."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from consumer.engine.base import ChatMessage, Engine
from consumer.operations.base import Prompt, Served
from consumer.settings import OperationLimits
from schemas.replies import ClassifyResult
from schemas.requests import ClassifyRequest

DEFAULT_MAX_TOKENS = 16


def classify_prompt(request: ClassifyRequest) -> tuple[ChatMessage, ...]:
    """The conversation whose reply each category is scored as."""
    listed = "\n".join(f"- {c}" for c in request.categories)
    system = (
        "You are a text classifier. Answer with exactly one category from this list "
        f"and nothing else:\n{listed}"
    )
    return (ChatMessage("system", system), ChatMessage("user", request.text))


@dataclass(frozen=True, slots=True)
class Classification:
    label: str
    confidence: float
    scores: dict[str, float]


def normalise_label_scores(categories: Sequence[str], logprobs: Sequence[float]) -> Classification:
    """Turn per-category log-likelihoods into probabilities that sum to 1 (softmax)."""
    if len(categories) != len(logprobs) or not categories:
        raise ValueError("one log-likelihood per category is required")
    peak = max(logprobs)
    if math.isinf(peak) and peak < 0:
        weights = [1.0] * len(logprobs)  # nothing was likely: uniform, not NaN
    else:
        weights = [math.exp(lp - peak) for lp in logprobs]
    total = sum(weights)
    probabilities = [w / total for w in weights]
    best = max(range(len(categories)), key=lambda i: (probabilities[i], -i))
    scores = {c: p for c, p in zip(categories, probabilities, strict=True)}
    return Classification(categories[best], probabilities[best], scores)


class Classify:
    name = "classify"

    def prompt(self, request: ClassifyRequest, limits: OperationLimits) -> Prompt:
        # Nothing is generated: the categories are scored, so no output tokens are reserved.
        return Prompt(classify_prompt(request), 0, candidates=tuple(request.categories))

    async def serve(self, engine: Engine, request: ClassifyRequest, prompt: Prompt) -> Served:
        started = time.perf_counter()
        scores = await engine.score(prompt.messages, prompt.candidates, prompt.work)
        verdict = normalise_label_scores(request.categories, scores.logprobs)
        result = ClassifyResult(
            label=verdict.label, confidence=verdict.confidence, scores=verdict.scores
        )
        elapsed = (time.perf_counter() - started) * 1000
        return Served(result, scores.input_tokens, 0, elapsed, None, scores.timings)

"""Prompt building and output parsing for each operation (pure: no I/O, no model)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from consumer.engine.base import ChatMessage, GenerationRequest
from schemas.requests import (
    OPERATION_LIMITS,
    ChatRequest,
    ClassifyRequest,
    SummarizeRequest,
    TranslateRequest,
)

LANGUAGE_NAMES: dict[str, str] = {
    "ar": "Arabic", "bn": "Bengali", "cs": "Czech", "da": "Danish", "de": "German",
    "el": "Greek", "en": "English", "es": "Spanish", "fa": "Persian", "fi": "Finnish",
    "fr": "French", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "no": "Norwegian",
    "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sv": "Swedish",
    "th": "Thai", "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese", "zh": "Chinese",
}  # fmt: skip

# Output budgets when a request gives no max_tokens: enough for the task, not the maximum.
DEFAULT_MAX_TOKENS = {"summarize": 256, "translate": 512, "classify": 16, "chat": 512}

# Closing quotes/brackets stay with their sentence (lookbehinds must be fixed-width).
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?。！？])|(?<=[.!?。！？][\"'”’)\]])|(?<=[.!?。！？][\"'”’)\]]{2}))\s+"
)


def language_name(code: str) -> str:
    """Human name of a language code for the prompt ('de-AT' -> 'German (de-AT)')."""
    base = code.replace("_", "-").split("-")[0].lower()
    name = LANGUAGE_NAMES.get(base)
    if name is None:
        return code
    return name if base == code.lower() else f"{name} ({code})"


def output_budget(operation: str, requested: int | None, configured_cap: int | None = None) -> int:
    """Tokens the engine may generate: the request's max_tokens within the operation's cap."""
    cap = configured_cap or OPERATION_LIMITS[operation].max_output_tokens
    return min(requested or DEFAULT_MAX_TOKENS[operation], cap)


def summarize_prompt(request: SummarizeRequest, max_tokens: int) -> GenerationRequest:
    noun = "sentence" if request.max_sentences == 1 else "sentences"
    system = (
        "You are a precise summarizer. Summarize the user's text in "
        f"{language_name(request.language)}, in at most {request.max_sentences} {noun}. "
        "Reply with the summary only."
    )
    return GenerationRequest(
        messages=(ChatMessage("system", system), ChatMessage("user", request.text)),
        max_tokens=max_tokens,
        temperature=0.0,
    )


def translate_prompt(request: TranslateRequest, max_tokens: int) -> GenerationRequest:
    source = (
        "the language it is written in"
        if request.source_language == "auto"
        else language_name(request.source_language)
    )
    system = (
        f"You are a translator. Translate the user's text from {source} into "
        f"{language_name(request.target_language)}. Reply with the translation only."
    )
    return GenerationRequest(
        messages=(ChatMessage("system", system), ChatMessage("user", request.text)),
        max_tokens=max_tokens,
        temperature=0.0,
    )


def classify_prompt(request: ClassifyRequest) -> tuple[ChatMessage, ...]:
    """The conversation whose reply each category is scored as."""
    listed = "\n".join(f"- {c}" for c in request.categories)
    system = (
        "You are a text classifier. Answer with exactly one category from this list "
        f"and nothing else:\n{listed}"
    )
    return (ChatMessage("system", system), ChatMessage("user", request.text))


def chat_prompt(request: ChatRequest, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        messages=tuple(ChatMessage(m.role, m.content) for m in request.messages),
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=tuple(request.stop or ()),
    )


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, split after terminal punctuation followed by whitespace."""
    flat = " ".join(text.split())
    if not flat:
        return []
    return [s.strip() for s in _SENTENCE_END.split(flat) if s.strip()]


@dataclass(frozen=True, slots=True)
class Summary:
    text: str
    sentence_count: int


def parse_summary(output: str, max_sentences: int) -> Summary:
    """Clean the model's summary and cut it to `max_sentences` sentences."""
    cleaned = _strip_preamble(output)
    sentences = split_sentences(cleaned)[:max_sentences]
    return Summary(" ".join(sentences), len(sentences))


def parse_translation(output: str) -> str:
    return _strip_preamble(output).strip()


_PREAMBLE = re.compile(
    r"^(summary|translation|here is[^:\n]{0,60}|here's[^:\n]{0,60}):\s*", re.IGNORECASE
)


def _strip_preamble(output: str) -> str:
    text = output.strip()
    # Small models like to announce themselves: "Summary: ...", "Here is the translation: ..."
    match = _PREAMBLE.match(text)
    return text[match.end() :] if match else text


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

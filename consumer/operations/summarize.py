"""summarize: a summary of `text` in at most `max_sentences` sentences, in `language`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from consumer.engine.base import ChatMessage, Engine, GenerationRequest
from consumer.operations.base import Prompt, Served, generate, output_budget, strip_preamble
from consumer.operations.languages import language_name
from consumer.settings import OperationLimits
from schemas.replies import SummarizeResult
from schemas.requests import SummarizeRequest

DEFAULT_MAX_TOKENS = 256

# Closing quotes/brackets stay with their sentence (lookbehinds must be fixed-width).
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?。！？])|(?<=[.!?。！？][\"'”’)\]])|(?<=[.!?。！？][\"'”’)\]]{2}))\s+"
)


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
    sentences = split_sentences(strip_preamble(output))[:max_sentences]
    return Summary(" ".join(sentences), len(sentences))


class Summarize:
    name = "summarize"

    def prompt(self, request: SummarizeRequest, limits: OperationLimits) -> Prompt:
        budget = output_budget(self.name, DEFAULT_MAX_TOKENS, request.max_tokens)
        generation = summarize_prompt(request, budget)
        return Prompt(generation.messages, generation.max_tokens, generation=generation)

    async def serve(self, engine: Engine, request: SummarizeRequest, prompt: Prompt) -> Served:
        def shape(text: str) -> SummarizeResult:
            summary = parse_summary(text, request.max_sentences)
            return SummarizeResult(summary=summary.text, sentence_count=summary.sentence_count)

        return await generate(engine, prompt, lambda g: shape(g.text))

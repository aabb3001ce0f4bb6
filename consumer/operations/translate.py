"""translate: `text` from `source_language` (or detected) into `target_language`."""

from __future__ import annotations

from consumer.engine.base import ChatMessage, Engine, GenerationRequest
from consumer.operations.base import Prompt, Served, generate, output_budget, strip_preamble
from consumer.operations.languages import language_name
from consumer.settings import OperationLimits
from schemas.replies import TranslateResult
from schemas.requests import TranslateRequest

DEFAULT_MAX_TOKENS = 512


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


def parse_translation(output: str) -> str:
    return strip_preamble(output).strip()


class Translate:
    name = "translate"

    def prompt(self, request: TranslateRequest, limits: OperationLimits) -> Prompt:
        budget = output_budget(self.name, DEFAULT_MAX_TOKENS, request.max_tokens)
        generation = translate_prompt(request, budget)
        return Prompt(generation.messages, generation.max_tokens, generation=generation)

    async def serve(self, engine: Engine, request: TranslateRequest, prompt: Prompt) -> Served:
        return await generate(
            engine,
            prompt,
            lambda g: TranslateResult(
                translated_text=parse_translation(g.text),
                source_language=request.source_language,
                target_language=request.target_language,
            ),
        )

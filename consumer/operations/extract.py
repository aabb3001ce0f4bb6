"""extract: a JSON object valid against the request's schema, found in `text` (constrained
decoding: the grammar allows only valid JSON, never parsed out of free text)."""

from __future__ import annotations

import json

from consumer.engine.base import ChatMessage, Engine, Generation, GenerationRequest
from consumer.engine.grammar.constraint import JsonConstraint
from consumer.operations.base import Prompt, Served, output_budget
from consumer.operations.structured import generate_json, parse_json_output
from consumer.settings import OperationLimits
from schemas.replies import ExtractResult
from schemas.requests import ExtractRequest

DEFAULT_MAX_TOKENS = 512


def extract_prompt(request: ExtractRequest, max_tokens: int) -> GenerationRequest:
    schema = json.dumps(request.json_schema, separators=(",", ":"), ensure_ascii=False)
    system = (
        "You extract information from the user's text into JSON. Reply with one JSON object "
        f"that follows this JSON Schema:\n{schema}\n"
        "Use only what the text says; leave out optional fields it does not mention."
    )
    if request.instructions:
        system += f"\nWhat to extract: {request.instructions}"
    return GenerationRequest(
        messages=(ChatMessage("system", system), ChatMessage("user", request.text)),
        max_tokens=max_tokens,
        temperature=0.0,
        constraint=JsonConstraint.for_schema(request.json_schema),
    )


class Extract:
    name = "extract"

    def prompt(self, request: ExtractRequest, limits: OperationLimits) -> Prompt:
        budget = output_budget(self.name, DEFAULT_MAX_TOKENS, request.max_tokens)
        generation = extract_prompt(request, budget)
        return Prompt(generation.messages, generation.max_tokens, generation=generation)

    async def serve(self, engine: Engine, request: ExtractRequest, prompt: Prompt) -> Served:
        def shape(generation: Generation) -> ExtractResult:
            return ExtractResult(data=parse_json_output(generation, prompt.max_tokens))

        return await generate_json(engine, prompt, shape, ["schema"])

"""What constrained (JSON) output shares between extract and chat's response_format: the
constraint a request asks for, refusals as validation errors, and parsing the finished JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from consumer.engine.base import Engine, Generation
from consumer.engine.grammar.constraint import JsonConstraint
from consumer.engine.grammar.errors import GrammarRefused
from consumer.errors import IncompleteOutput, ValidationFailed
from consumer.operations.base import Prompt, Result, Served, generate
from schemas.replies import FieldError
from schemas.requests import ChatRequest, JsonObjectFormat, JsonSchemaFormat


def response_constraint(request: ChatRequest) -> JsonConstraint | None:
    """The JSON constraint of a chat request's `response_format` (None: plain text)."""
    form = request.response_format
    if isinstance(form, JsonSchemaFormat):
        return JsonConstraint.for_schema(form.json_schema)
    if isinstance(form, JsonObjectFormat):
        return JsonConstraint.any_object()
    return None


def parse_json_output(generation: Generation, max_tokens: int) -> dict[str, Any]:
    """The JSON object a constrained generation wrote; IncompleteOutput if it stopped before
    the object was complete (only `max_tokens` can stop it earlier: the grammar allows no
    end-of-turn before)."""
    try:
        value = json.loads(generation.text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        reason = (
            f"the output reached max_tokens ({max_tokens}) before its JSON was complete; "
            "raise max_tokens or ask for less"
            if generation.finish_reason == "length"
            else "the output ended before its JSON was complete (a stop string, or the "
            "grammar engine's per-step limit)"
        )
        raise IncompleteOutput(
            reason,
            input_tokens=generation.input_tokens,
            output_tokens=generation.output_tokens,
        )
    return value


async def generate_json(
    engine: Engine,
    prompt: Prompt,
    shape: Callable[[Generation], Result],
    schema_loc: list[str | int],
) -> Served:
    """Run a constrained prompt; a schema the grammar engine refuses is a validation error
    at `schema_loc`."""
    try:
        return await generate(engine, prompt, shape)
    except GrammarRefused as exc:
        raise ValidationFailed(
            str(exc), errors=[FieldError(loc=schema_loc, msg=str(exc), type="json_schema")]
        ) from exc

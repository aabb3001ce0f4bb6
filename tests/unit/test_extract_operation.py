"""extract and chat's response_format as operations (pure parts, against a stand-in engine):
the prompt carries the constraint, a complete JSON object is the result, an output cut by
max_tokens is `incomplete_output` with its tokens, a schema the engine refuses is `validation`."""

from __future__ import annotations

from typing import Any

import pytest

from consumer.engine.base import Generation, GenerationRequest
from consumer.engine.grammar import GrammarRefused, JsonConstraint
from consumer.errors import IncompleteOutput, ValidationFailed
from consumer.operations import operation_of
from consumer.settings import OperationLimits
from schemas import operation_request_adapter
from schemas.replies import ChatResult, ExtractResult
from tests.support.extract_corpus import SCHEMAS

LIMITS = OperationLimits()


class AnsweringEngine:
    """Answers every generate with one canned Generation (or raises), keeping the request."""

    def __init__(self, answer: Generation | Exception) -> None:
        self.answer = answer
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def extract_request(**fields: Any) -> Any:
    body = {"operation": "extract", "tenant_id": "t1", "text": "Maria is 34.",
            "schema": SCHEMAS["person"], **fields}  # fmt: skip
    return operation_request_adapter.validate_python(body)


def done(text: str, finish: str = "stop", output_tokens: int = 9) -> Generation:
    return Generation(text=text, finish_reason=finish, input_tokens=40, output_tokens=output_tokens)  # type: ignore[arg-type]


async def test_extract_prompts_with_the_schema_and_constrains_to_it() -> None:
    request = extract_request(instructions="the person named", max_tokens=64)
    prompt = operation_of(request).prompt(request, LIMITS)
    assert prompt.generation is not None and prompt.max_tokens == 64
    assert prompt.generation.constraint == JsonConstraint.for_schema(SCHEMAS["person"])
    assert prompt.generation.temperature == 0.0
    system, user = prompt.generation.messages
    assert '"age"' in system.content and "the person named" in system.content
    assert user.content == "Maria is 34."


async def test_a_complete_json_object_is_the_result() -> None:
    request = extract_request()
    engine = AnsweringEngine(done('{"name":"Maria","age":34}'))
    served = await operation_of(request).serve(
        engine, request, operation_of(request).prompt(request, LIMITS)
    )  # type: ignore[arg-type]
    assert served.result == ExtractResult(data={"name": "Maria", "age": 34})
    assert (served.input_tokens, served.output_tokens) == (40, 9)


async def test_output_cut_at_max_tokens_is_incomplete_output_with_its_tokens() -> None:
    request = extract_request(max_tokens=5)
    engine = AnsweringEngine(done('{"name":"Ma', finish="length", output_tokens=5))
    operation = operation_of(request)
    with pytest.raises(IncompleteOutput) as caught:
        await operation.serve(engine, request, operation.prompt(request, LIMITS))  # type: ignore[arg-type]
    assert caught.value.code == "incomplete_output" and caught.value.http_status == 422
    assert "max_tokens (5)" in caught.value.message
    assert (caught.value.input_tokens, caught.value.output_tokens) == (40, 5)


async def test_a_schema_the_engine_refuses_is_a_validation_error_at_schema() -> None:
    request = extract_request()
    engine = AnsweringEngine(GrammarRefused("the schema cannot be compiled: bad regex"))
    operation = operation_of(request)
    with pytest.raises(ValidationFailed) as caught:
        await operation.serve(engine, request, operation.prompt(request, LIMITS))  # type: ignore[arg-type]
    (error,) = caught.value.details["errors"]
    assert error.loc == ["schema"] and "bad regex" in error.msg


@pytest.mark.parametrize(
    ("response_format", "constraint"),
    [
        ({"type": "json_schema", "schema": SCHEMAS["tags"]},
         JsonConstraint.for_schema(SCHEMAS["tags"])),
        ({"type": "json_object"}, JsonConstraint.any_object()),
        ({"type": "text"}, None),
        (None, None),
    ],
)  # fmt: skip
async def test_chat_response_format_sets_the_constraint(
    response_format: dict[str, Any] | None, constraint: JsonConstraint | None
) -> None:
    messages = [{"role": "user", "content": "tags for a cake recipe"}]
    body: dict[str, Any] = {
        "operation": "chat",
        "tenant_id": "t1",
        "temperature": 0.8,
        "messages": messages,
    }
    if response_format is not None:
        body["response_format"] = response_format
    request = operation_request_adapter.validate_python(body)
    operation = operation_of(request)
    prompt = operation.prompt(request, LIMITS)
    assert prompt.generation is not None and prompt.generation.constraint == constraint
    assert prompt.generation.temperature == 0.8  # sampled decoding is constrained too
    engine = AnsweringEngine(done('{"tags":["cake"]}'))
    served = await operation.serve(engine, request, prompt)  # type: ignore[arg-type]
    assert isinstance(served.result, ChatResult)
    assert served.result.message.content == '{"tags":["cake"]}'


async def test_chat_json_cut_at_max_tokens_is_incomplete_output() -> None:
    body = {"operation": "chat", "tenant_id": "t1", "max_tokens": 3,
            "messages": [{"role": "user", "content": "json please"}],
            "response_format": {"type": "json_object"}}  # fmt: skip
    request = operation_request_adapter.validate_python(body)
    operation = operation_of(request)
    with pytest.raises(IncompleteOutput):
        await operation.serve(
            AnsweringEngine(done('{"a', finish="length", output_tokens=3)),  # type: ignore[arg-type]
            request,
            operation.prompt(request, LIMITS),
        )

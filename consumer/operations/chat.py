"""chat: an OpenAI chat-completions shaped conversation, answered with one message."""

from __future__ import annotations

from consumer.engine.base import ChatMessage, Engine, Generation, GenerationRequest
from consumer.errors import ValidationFailed
from consumer.operations.base import Prompt, Served, generate, output_budget
from consumer.operations.structured import (
    generate_json,
    parse_json_output,
    response_constraint,
)
from consumer.settings import OperationLimits
from schemas.replies import AssistantMessage, ChatResult, FieldError
from schemas.requests import ChatRequest

DEFAULT_MAX_TOKENS = 512


def chat_prompt(request: ChatRequest, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        messages=tuple(ChatMessage(m.role, m.content) for m in request.messages),
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=tuple(request.stop or ()),
        constraint=response_constraint(request),
    )


def check_chat_limits(request: ChatRequest, limits: OperationLimits) -> None:
    """Chat's bounds are settings (the others' are in the contract): ValidationFailed."""
    problems: list[FieldError] = []
    if len(request.messages) > limits.chat_max_messages:
        problems.append(
            FieldError(
                loc=["messages"],
                msg=f"at most {limits.chat_max_messages} messages are allowed",
                type="too_long",
            )
        )
    if request.text_chars() > limits.chat_max_input_chars:
        problems.append(
            FieldError(
                loc=["messages"],
                msg=f"messages may hold at most {limits.chat_max_input_chars} characters",
                type="too_long",
            )
        )
    if request.max_tokens is not None and request.max_tokens > limits.chat_max_output_tokens:
        problems.append(
            FieldError(
                loc=["max_tokens"],
                msg=f"max_tokens must be <= {limits.chat_max_output_tokens} for chat",
                type="less_than_equal",
            )
        )
    if problems:
        raise ValidationFailed("request exceeds the configured chat limits", errors=problems)


class Chat:
    name = "chat"

    def prompt(self, request: ChatRequest, limits: OperationLimits) -> Prompt:
        check_chat_limits(request, limits)
        budget = output_budget(
            self.name, DEFAULT_MAX_TOKENS, request.max_tokens, limits.chat_max_output_tokens
        )
        generation = chat_prompt(request, budget)
        return Prompt(generation.messages, generation.max_tokens, generation=generation)

    async def serve(self, engine: Engine, request: ChatRequest, prompt: Prompt) -> Served:
        def shape(generation: Generation) -> ChatResult:
            return ChatResult(
                message=AssistantMessage(content=generation.text),
                finish_reason=generation.finish_reason,
            )

        if request.response_format is None or request.response_format.type == "text":
            return await generate(engine, prompt, shape)

        def shape_json(generation: Generation) -> ChatResult:
            # The content is the JSON text as generated (what the stream's chunks add up to).
            parse_json_output(generation, prompt.max_tokens)
            return shape(generation)

        return await generate_json(engine, prompt, shape_json, ["response_format", "schema"])

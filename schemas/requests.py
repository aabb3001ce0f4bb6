"""Operation requests: the JSON body producers publish to the request topic."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from schemas.structured import SchemaLimits, SchemaProblem, check_json_schema

SCHEMA_VERSION = 1

TenantId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
RequestId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
LanguageCode = Annotated[
    str,
    Field(min_length=2, max_length=35, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$|^auto$"),
]

MAX_CATEGORIES = 50
MAX_CATEGORY_CHARS = 100


class OperationLimit(BaseModel):
    """Fixed per-operation bounds of the contract (the original platform's)."""

    model_config = ConfigDict(frozen=True)

    max_input_chars: int
    max_output_tokens: int
    schema_limits: SchemaLimits | None = Field(
        default=None, description="Caps on a JSON Schema the request asks the output to follow."
    )


OPERATION_LIMITS: dict[str, OperationLimit] = {
    "summarize": OperationLimit(max_input_chars=8000, max_output_tokens=512),
    "translate": OperationLimit(max_input_chars=4000, max_output_tokens=512),
    "classify": OperationLimit(max_input_chars=2000, max_output_tokens=64),
    # chat's bounds are settings (consumer.settings.OperationLimits); these are hard caps.
    "chat": OperationLimit(
        max_input_chars=200_000, max_output_tokens=32_768, schema_limits=SchemaLimits()
    ),
    "extract": OperationLimit(
        max_input_chars=8000, max_output_tokens=1024, schema_limits=SchemaLimits()
    ),
}


class RequestEnvelope(BaseModel):
    """Fields every operation request carries."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    operation: ClassVar[str]

    schema_version: Literal[1] = Field(default=1, description="Envelope version.")
    tenant_id: TenantId
    request_id: RequestId | None = Field(
        default=None,
        description="Idempotency key; defaults to the correlation id.",
    )
    deadline: datetime | None = Field(
        default=None, description="Absolute time (ISO 8601 with offset) after which not to run."
    )
    timeout_ms: int | None = Field(
        default=None, ge=1, le=3_600_000, description="Relative deadline from when it was produced."
    )
    max_tokens: int | None = Field(default=None, ge=1, description="Output token budget.")
    priority: Literal["interactive", "batch"] = Field(
        default="interactive",
        description="interactive: served first. batch: fills idle capacity and may be paused "
        "(then resumed) when interactive work arrives.",
    )

    @field_validator("deadline")
    @classmethod
    def _deadline_has_zone(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("deadline must include a UTC offset, e.g. 2026-01-01T12:00:00Z")
        return value

    @model_validator(mode="after")
    def _max_tokens_within_operation_limit(self) -> RequestEnvelope:
        limit = OPERATION_LIMITS[self.operation].max_output_tokens
        if self.max_tokens is not None and self.max_tokens > limit:
            raise ValueError(f"max_tokens must be <= {limit} for {self.operation}")
        return self

    def text_chars(self) -> int:
        """Characters of input text the model reads (what the input limits bound)."""
        raise NotImplementedError


def _text_field(operation: str, description: str) -> object:
    return Field(
        min_length=1,
        max_length=OPERATION_LIMITS[operation].max_input_chars,
        description=description,
    )


class SummarizeRequest(RequestEnvelope):
    """Summarize `text` in at most `max_sentences` sentences."""

    operation: Literal["summarize"] = "summarize"  # type: ignore[misc]
    stream: bool = Field(
        default=False,
        description="Publish the text as it is generated (StreamChunk records, status "
        "'chunk') before the final reply.",
    )
    text: str = _text_field("summarize", "Text to summarize (at most 8000 characters).")  # type: ignore[assignment]
    max_sentences: int = Field(default=3, ge=1, le=20)
    language: LanguageCode = Field(default="en", description="Language of the summary.")

    def text_chars(self) -> int:
        return len(self.text)


class TranslateRequest(RequestEnvelope):
    """Translate `text` from `source_language` (or auto-detect) into `target_language`."""

    operation: Literal["translate"] = "translate"  # type: ignore[misc]
    stream: bool = Field(
        default=False,
        description="Publish the text as it is generated (StreamChunk records, status "
        "'chunk') before the final reply.",
    )
    text: str = _text_field("translate", "Text to translate (at most 4000 characters).")  # type: ignore[assignment]
    source_language: LanguageCode = "auto"
    target_language: LanguageCode

    def text_chars(self) -> int:
        return len(self.text)


class ClassifyRequest(RequestEnvelope):
    """Pick the most likely of `categories` for `text`, with a probability for each."""

    operation: Literal["classify"] = "classify"  # type: ignore[misc]
    text: str = _text_field("classify", "Text to classify (at most 2000 characters).")  # type: ignore[assignment]
    categories: list[Annotated[str, Field(min_length=1, max_length=MAX_CATEGORY_CHARS)]] = Field(
        min_length=2, max_length=MAX_CATEGORIES
    )

    @field_validator("categories")
    @classmethod
    def _deduplicate(cls, categories: list[str]) -> list[str]:
        unique = list(dict.fromkeys(c.strip() for c in categories))
        if any(not c for c in unique):
            raise ValueError("categories must not be blank")
        if len(unique) < 2:
            raise ValueError("at least two distinct categories are needed")
        return unique

    def text_chars(self) -> int:
        return len(self.text)


class ChatTurn(BaseModel):
    """One message of an OpenAI-style conversation."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=OPERATION_LIMITS["chat"].max_input_chars)


def _supported_schema(schema: dict[str, Any], operation: str) -> dict[str, Any]:
    """`schema` if constrained decoding enforces it within the operation's caps; else a
    validation error naming the JSON pointer and keyword (`schemas.structured`)."""
    limits = OPERATION_LIMITS[operation].schema_limits or SchemaLimits()
    try:
        check_json_schema(schema, limits)
    except SchemaProblem as problem:
        raise PydanticCustomError(
            "json_schema",
            "{message}",
            {"message": str(problem), "pointer": problem.pointer, "keyword": problem.keyword},
        ) from None
    return schema


class JsonSchemaFormat(BaseModel):
    """`response_format` asking for a JSON object valid against `schema` (constrained
    decoding). OpenAI's nesting (`{"type": "json_schema", "json_schema": {"name": ...,
    "schema": {...}, "strict": true}}`) is accepted too."""

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(
        alias="schema", description="JSON Schema of the reply (root type object)."
    )
    name: str | None = Field(default=None, max_length=64)
    strict: bool | None = Field(default=None, description="Accepted; always enforced.")

    @model_validator(mode="before")
    @classmethod
    def _lift_openai_nesting(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("json_schema"), dict):
            nested = value["json_schema"]
            return {**{k: v for k, v in value.items() if k != "json_schema"}, **nested}
        return value

    @field_validator("json_schema")
    @classmethod
    def _schema_is_supported(cls, schema: dict[str, Any]) -> dict[str, Any]:
        return _supported_schema(schema, "chat")


class JsonObjectFormat(BaseModel):
    """`response_format` asking for any JSON object (constrained decoding)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object"]


class TextFormat(BaseModel):
    """`response_format` asking for plain text (the default)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


ResponseFormat = Annotated[
    JsonSchemaFormat | JsonObjectFormat | TextFormat, Field(discriminator="type")
]


class ChatRequest(RequestEnvelope):
    """OpenAI chat-completions shaped request."""

    operation: Literal["chat"] = "chat"  # type: ignore[misc]
    stream: bool = Field(
        default=False,
        description="Publish the text as it is generated (StreamChunk records, status "
        "'chunk') before the final reply.",
    )
    messages: list[ChatTurn] = Field(min_length=1, max_length=1024)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None, max_length=4
    )

    response_format: ResponseFormat | None = Field(
        default=None,
        description="OpenAI's: {'type': 'json_schema', 'schema': {...}} or {'type': "
        "'json_object'} constrain the reply to JSON (the message content is the JSON text); "
        "{'type': 'text'} is the default.",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _ends_with_user_turn(self) -> ChatRequest:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return self

    def text_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)


class ExtractRequest(RequestEnvelope):
    """Extract from `text` a JSON object valid against `schema`, by constrained decoding."""

    model_config = ConfigDict(serialize_by_alias=True)

    operation: Literal["extract"] = "extract"  # type: ignore[misc]
    stream: bool = Field(
        default=False,
        description="Publish the JSON text as it is generated (StreamChunk records, status "
        "'chunk') before the final reply, which carries the parsed object.",
    )
    text: str = _text_field("extract", "Text to extract from (at most 8000 characters).")  # type: ignore[assignment]
    json_schema: dict[str, Any] = Field(
        alias="schema",
        description="JSON Schema (draft 2020-12 subset; root type object) the result's `data` "
        "follows. Supported: type, properties, required, additionalProperties, "
        "patternProperties, min/maxProperties, items, prefixItems, min/maxItems, enum, const, "
        "min/maxLength, pattern, format (date, time, date-time, duration, email, hostname, "
        "ipv4, ipv6, uuid, uri), minimum, maximum, exclusiveMinimum/Maximum, multipleOf, "
        "anyOf, oneOf, allOf, local non-recursive $ref with $defs; annotations (title, "
        "description, default, examples) are ignored; anything else is refused.",
    )
    instructions: str | None = Field(
        default=None, min_length=1, max_length=2000, description="What to extract, in words."
    )

    @field_validator("json_schema")
    @classmethod
    def _schema_is_supported(cls, schema: dict[str, Any]) -> dict[str, Any]:
        return _supported_schema(schema, "extract")

    def text_chars(self) -> int:
        return len(self.text) + len(self.instructions or "")


OperationRequest = Annotated[
    SummarizeRequest | TranslateRequest | ClassifyRequest | ChatRequest | ExtractRequest,
    Field(discriminator="operation"),
]
OPERATIONS: tuple[str, ...] = tuple(OPERATION_LIMITS)


class CancelRequest(BaseModel):
    """Stop a request of the same tenant: queued, it never runs; running, it stops at the next
    decode step. Keyed by tenant like the request, so it reaches the instance that owns it."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = Field(default=1, description="Envelope version.")
    operation: Literal["cancel"] = "cancel"
    tenant_id: TenantId
    request_id: RequestId = Field(description="The request to cancel (its request_id).")


operation_request_adapter: TypeAdapter[
    SummarizeRequest | TranslateRequest | ClassifyRequest | ChatRequest | ExtractRequest
] = TypeAdapter(OperationRequest)

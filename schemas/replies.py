"""Replies: the JSON body the consumer publishes to a request's reply topic."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ErrorCode = Literal[
    "validation",
    "unauthorized",
    "duplicate_request",
    "in_progress",
    "quota_exceeded",
    "deadline_exceeded",
    "overloaded",
    "cancelled",
    "incomplete_output",
    "internal",
]
HTTP_STATUS: dict[str, int] = {
    "validation": 422,
    "unauthorized": 403,
    "duplicate_request": 409,
    "in_progress": 409,
    "quota_exceeded": 429,
    "deadline_exceeded": 504,
    "overloaded": 503,
    "cancelled": 499,  # nginx's "client closed request": the requester asked to stop
    # The output reached max_tokens before the JSON its schema asks for was complete: the
    # request's budget was too small for it (raise max_tokens, or ask for less).
    "incomplete_output": 422,
    "internal": 500,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldError(_Strict):
    """One validation problem: where, what and why (never the offending input)."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorInfo(_Strict):
    """Why a request was not answered with a result."""

    code: ErrorCode
    message: str
    retryable: bool
    http_status: int = Field(description="The HTTP status the original platform used.")
    errors: list[FieldError] | None = Field(default=None, description="validation: field errors")
    limit: int | None = Field(default=None, description="quota_exceeded: the limit that tripped")
    used: int | None = None
    remaining: int | None = None
    resets_at: datetime | None = None
    limit_name: str | None = Field(
        default=None, description="quota_exceeded: which limit, e.g. 'summarize.requests'"
    )
    reason: str | None = Field(
        default=None, description="unauthorized: missing_signature, unknown_key, wrong_tenant, …"
    )
    original_status: str | None = Field(
        default=None,
        description="duplicate_request: how the request that used the id first ended "
        "(ok, an error code, or in_progress)",
    )


class Meta(_Strict):
    """How the request was served."""

    operation: str | None = None
    model_used: str | None = None
    input_chars: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    queue_ms: float = Field(
        default=0.0, description="From the fetch to the start of execution: admission + slot wait."
    )
    execution_time_ms: float = Field(
        default=0.0, description="Time the engine ran the request: prefill + generation."
    )
    request_id: str | None = None
    timestamp: datetime
    # The stages of the request's life (ms), as the usage row's columns of the same names.
    bus_ms: float | None = Field(
        default=None, description="From the record's Kafka timestamp to the consumer's fetch."
    )
    admission_ms: float | None = Field(
        default=None, description="From the fetch to the engine (checks, quota write)."
    )
    slot_wait_ms: float | None = Field(
        default=None, description="Waiting in the scheduler for an engine slot."
    )
    prefill_ms: float | None = Field(
        default=None, description="From taking a slot to the first token."
    )
    generation_ms: float | None = Field(
        default=None, description="From the first token to the last."
    )
    total_ms: float | None = Field(
        default=None, description="From the fetch to the reply (bus_ms not included)."
    )
    replayed: bool | None = Field(
        default=None,
        description="True: this is the stored reply of an earlier record with the same "
        "tenant, request_id and body (not run or charged again); its other fields are the "
        "original's.",
    )


class SummarizeResult(_Strict):
    summary: str
    sentence_count: int


class TranslateResult(_Strict):
    translated_text: str
    source_language: str
    target_language: str


class ClassifyResult(_Strict):
    label: str
    confidence: float = Field(ge=0.0, le=1.0)
    scores: dict[str, float]


class AssistantMessage(_Strict):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatResult(_Strict):
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ExtractResult(_Strict):
    """What `extract` found: `data` is valid against the request's schema."""

    data: dict[str, Any]


class CancelResult(_Strict):
    """What a `cancel` found: `cancelled` is false when no request of the tenant with that id
    was open here (it finished already, or never came)."""

    request_id: str
    cancelled: bool


Result = Annotated[
    SummarizeResult | TranslateResult | ClassifyResult | ChatResult | ExtractResult | CancelResult,
    Field(union_mode="left_to_right"),
]


class OperationReply(_Strict):
    """Every reply: `status`, then a `result` (ok) or an `error` (error), and `meta`."""

    schema_version: Literal[1] = 1
    status: Literal["ok", "error"]
    result: Result | None = None
    error: ErrorInfo | None = None
    meta: Meta

    @model_validator(mode="after")
    def _result_xor_error(self) -> OperationReply:
        if (self.status == "ok") != (self.result is not None) or (self.status == "error") != (
            self.error is not None
        ):
            raise ValueError("status 'ok' carries a result; status 'error' carries an error")
        return self


class StreamChunk(_Strict):
    """A piece of a streamed reply (`"stream": true`), published before the final reply.

    Same correlation id as the reply; `seq` counts from 1 per request. Concatenated in `seq`
    order the deltas are the model's raw text so far (the final reply's result may be tidied,
    e.g. a summary without its preamble). After a consumer crash a request may run again and
    its chunks start again from 1: drop a `seq` already seen.
    """

    schema_version: Literal[1] = 1
    status: Literal["chunk"] = "chunk"
    seq: int = Field(ge=1)
    delta: str
    request_id: str | None = None

"""The two error families: reply errors (a wire `code`, turned into an error reply in one
place, `pipeline.respond.error_reply`) and infrastructure errors (the broker, the disk, the
state store: retried or fatal, never a reply)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from schemas.replies import HTTP_STATUS

# ── reply errors ──


class OpstreamError(Exception):
    """Base of every error that becomes an error reply.

    `message` must never contain prompt or completion text: it goes on the wire
    and into logs.
    """

    code: ClassVar[str] = "internal"
    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable
        self.details = details

    @property
    def http_status(self) -> int:
        """The HTTP status users know for this code (the contract's one map)."""
        return HTTP_STATUS[self.code]


class ValidationFailed(OpstreamError):
    """The request is malformed or out of bounds (HTTP 422)."""

    code = "validation"


class Unauthorized(OpstreamError):
    """The request's signature is missing, wrong, stale or for another tenant (HTTP 403)."""

    code = "unauthorized"


class DuplicateRequest(OpstreamError):
    """Another request already used this request_id (HTTP 409); `original_status` says how
    that one ended."""

    code = "duplicate_request"


class InProgress(OpstreamError):
    """A retry of a request that is still running (HTTP 409, retryable): its reply comes to
    the first record's route, and a retry after it finished gets that reply."""

    code = "in_progress"
    retryable = True


class QuotaExceeded(OpstreamError):
    """The tenant has used up a daily limit (HTTP 429)."""

    code = "quota_exceeded"

    def __init__(
        self,
        message: str,
        *,
        limit: int,
        used: int,
        remaining: int,
        resets_at: datetime,
        **details: Any,
    ) -> None:
        super().__init__(
            message, limit=limit, used=used, remaining=remaining, resets_at=resets_at, **details
        )


class DeadlineExceeded(OpstreamError):
    """The request's deadline passed before it could run (HTTP 504)."""

    code = "deadline_exceeded"


class Overloaded(OpstreamError):
    """The engine's queue is full; nothing ran and nothing was charged (HTTP 503)."""

    code = "overloaded"
    retryable = True


class RequestCancelled(OpstreamError):
    """The tenant cancelled the request (HTTP 499); what it generated until then is charged."""

    code = "cancelled"


class IncompleteOutput(OpstreamError):
    """The output reached `max_tokens` before the JSON its schema asks for was complete
    (HTTP 422): the model ran, and what it generated is charged."""

    code = "incomplete_output"

    def __init__(self, message: str, *, input_tokens: int, output_tokens: int) -> None:
        super().__init__(message)
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens


class InternalError(OpstreamError):
    """Something failed on our side while serving the request (HTTP 500)."""

    code = "internal"


# ── infrastructure errors ──


class InfrastructureError(Exception):
    """A dependency failed (broker, disk, state store); `retryable` says whether waiting
    and trying again can help. Never sent to a requester as such."""

    retryable: bool = True


class TopicMissing(InfrastructureError):
    """A record's destination topic does not exist or may not be written (the record is
    dead-lettered instead, so its partition moves on)."""

    retryable = False

"""Domain errors with a wire `code`; `error_info` is the one place they become reply errors."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar


class OpstreamError(Exception):
    """Base of every error that becomes an error reply.

    `message` must never contain prompt or completion text: it goes on the wire
    and into logs.
    """

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable
        self.details = details


class ValidationFailed(OpstreamError):
    """The request is malformed or out of bounds (HTTP 422)."""

    code = "validation"
    http_status = 422


class Unauthorized(OpstreamError):
    """The request's signature is missing, wrong, stale or for another tenant (HTTP 403)."""

    code = "unauthorized"
    http_status = 403


class QuotaExceeded(OpstreamError):
    """The tenant has used up a daily limit (HTTP 429)."""

    code = "quota_exceeded"
    http_status = 429

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


class DuplicateRequest(OpstreamError):
    """Another request already used this request_id (HTTP 409); `original_status` says how
    that one ended."""

    code = "duplicate_request"
    http_status = 409


class DeadlineExceeded(OpstreamError):
    """The request's deadline passed before it could run (HTTP 504)."""

    code = "deadline_exceeded"
    http_status = 504


class Overloaded(OpstreamError):
    """The service cannot take the request now; try again later (HTTP 503)."""

    code = "overloaded"
    http_status = 503
    retryable = True


class InternalError(OpstreamError):
    """Something failed on our side (HTTP 500)."""

    code = "internal"
    http_status = 500


class TopicMissing(Exception):
    """A record's destination topic does not exist or may not be written (not a reply error:
    the record is dead-lettered instead, so its partition moves on)."""

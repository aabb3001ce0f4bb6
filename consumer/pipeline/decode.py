"""Step 1: a record's bytes to a JSON object, a reply route and a typed request (pure)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import ValidationError

from consumer.bus.records import InboundRecord, ReplyRoute
from consumer.errors import ValidationFailed
from consumer.operations.base import AnyRequest
from schemas.headers import CORRELATION_ID, REPLY_TO
from schemas.replies import FieldError
from schemas.requests import CancelRequest, operation_request_adapter


def decode_object(value: bytes | None) -> tuple[dict[str, Any] | None, str]:
    """The body as a JSON object, or None and why not (never quoting the body)."""
    if not value:
        return None, "empty body"
    try:
        decoded = json.loads(value)
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 (byte {exc.start})"
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        return None, "JSON nested too deeply"
    if not isinstance(decoded, dict):
        return None, f"JSON {type(decoded).__name__} is not an object"
    return decoded, ""


# A retry may compute its deadline afresh; what it asks for is the rest of the body.
_NOT_THE_REQUEST = frozenset({"deadline", "timeout_ms"})


def body_digest(body: dict[str, Any]) -> str:
    """A digest of what a request asks for: its body (not its signature, timestamp or
    correlation id, which are headers; not its deadline), key order and spacing ignored.
    Equal for a retry of the same request, different for any other."""
    asked = {k: v for k, v in body.items() if k not in _NOT_THE_REQUEST}
    canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def parse_request(body: dict[str, Any]) -> AnyRequest:
    """The typed request, or ValidationFailed with field errors."""
    try:
        return operation_request_adapter.validate_python(body)
    except ValidationError as exc:
        raise ValidationFailed(
            f"request is invalid ({exc.error_count()} error(s))", errors=field_errors(exc)
        ) from None


def parse_cancel(body: dict[str, Any]) -> CancelRequest:
    """The typed cancel, or ValidationFailed with field errors."""
    try:
        return CancelRequest.model_validate(body)
    except ValidationError as exc:
        raise ValidationFailed(
            f"cancel is invalid ({exc.error_count()} error(s))", errors=field_errors(exc)
        ) from None


def field_errors(exc: ValidationError) -> list[FieldError]:
    """Field errors without the offending input values (they may be prompt text)."""
    return [
        FieldError(
            loc=[str(p) if not isinstance(p, int) else p for p in e["loc"]],
            msg=e["msg"],
            type=e["type"],
        )
        for e in exc.errors(include_input=False, include_url=False, include_context=False)
    ]


def body_route(
    record: InboundRecord, request_id: str | None, default_topic: str
) -> ReplyRoute | None:
    """The route of a request without a correlation header: its request_id correlates."""
    if request_id is None:
        return None
    requested = record.header(REPLY_TO)
    return ReplyRoute(
        topic=requested or default_topic,
        requested_topic=requested,
        partition=None,
        correlation_header=CORRELATION_ID,
        correlation=request_id.encode(),
        correlation_id=request_id,
    )


def str_or_none(value: object, max_len: int) -> str | None:
    """`value` when it is a non-empty string of at most `max_len` characters."""
    return value if isinstance(value, str) and 0 < len(value) <= max_len else None

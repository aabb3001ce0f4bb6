"""The admin HTTP API for limits (GET/PUT /limits, GET /limits/usage) as plain ASGI apps."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from aiokafka.errors import KafkaError
from faststream.asgi import AsgiResponse
from pydantic import BaseModel, ValidationError

from consumer.quota.arithmetic import KEEP, Keep, OverrideValue, merge_override, remaining
from consumer.quota.control import LimitCommandPublisher, LimitFollower
from consumer.quota.settings import QuotaHostSettings
from consumer.quota.store import QuotaStore
from schemas.limits import (
    ALL_TENANTS,
    OPERATIONS,
    TOTAL,
    ErrorResponse,
    LimitsResponse,
    OperationLimit,
    OperationUsage,
    UpdateLimitRequest,
    UsageResponse,
)

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 64 * 1024

# Hard per-request caps of the contract (DESIGN.md "Message contract"), shown by GET /limits
# as in the original platform; chat's come from settings.
_FIXED_CAPS: dict[str, tuple[int, int]] = {
    "summarize": (8000, 512),
    "translate": (4000, 512),
    "classify": (2000, 64),
}


class _HttpError(Exception):
    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail


def _json(
    model: BaseModel, status: int = 200, headers: dict[str, str] | None = None
) -> AsgiResponse:
    return AsgiResponse(
        model.model_dump_json().encode(),
        status,
        {"Content-Type": "application/json", **(headers or {})},
    )


def _query(scope: Scope) -> dict[str, str]:
    raw = scope.get("query_string", b"").decode("latin-1")
    return {k: v[-1] for k, v in parse_qs(raw).items()}


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _HttpError(400, "client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _HttpError(413, "request body too large", {"max_bytes": MAX_BODY_BYTES})
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class LimitsAdminApi:
    """Handlers of the limits admin API, guarded by `settings.quota.admin_key`."""

    def __init__(
        self,
        store: QuotaStore,
        publisher: LimitCommandPublisher,
        settings: QuotaHostSettings,
        follower: LimitFollower | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.follower = follower
        self.admin_key = settings.quota.admin_key
        self.caps = {
            **_FIXED_CAPS,
            "chat": (settings.limits.chat_max_input_chars, settings.limits.chat_max_output_tokens),
        }

    async def limits(self, scope: Scope, receive: Receive, send: Send) -> None:
        """GET /limits (effective limits) and PUT /limits (change one override)."""
        await self._serve(scope, receive, send, {"GET": self._get_limits, "PUT": self._put_limits})

    async def usage(self, scope: Scope, receive: Receive, send: Send) -> None:
        """GET /limits/usage: today's counts and what is left, per tenant and operation."""
        await self._serve(scope, receive, send, {"GET": self._get_usage})

    # ── plumbing ──

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        handlers: dict[str, Callable[[Scope, Receive], Awaitable[AsgiResponse]]],
    ) -> None:
        try:
            handler = handlers.get(scope.get("method", ""))
            if handler is None:
                response = _json(
                    ErrorResponse(error="method not allowed"),
                    405,
                    {"Allow": ", ".join(handlers)},
                )
            else:
                self._authorize(scope)
                response = await handler(scope, receive)
        except _HttpError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            response = _json(ErrorResponse(error=exc.error, detail=exc.detail), exc.status, headers)
        await response(scope, receive, send)

    def _authorize(self, scope: Scope) -> None:
        if self.admin_key is None:
            raise _HttpError(403, "admin API disabled", "set OPSTREAM_QUOTA__ADMIN_KEY to enable")
        given = _header(scope, b"x-admin-key")
        if given is None:
            auth = _header(scope, b"authorization") or ""
            scheme, _, token = auth.partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else None
        expected = self.admin_key.get_secret_value().encode()
        if not given or not hmac.compare_digest(given.encode(), expected):
            raise _HttpError(401, "unauthorized", "missing or wrong admin key")

    # ── handlers ──

    async def _get_limits(self, scope: Scope, receive: Receive) -> AsgiResponse:
        tenant = _query(scope).get("tenant_id")
        return _json(self._limits_response(tenant))

    async def _put_limits(self, scope: Scope, receive: Receive) -> AsgiResponse:
        body = await _read_body(receive)
        try:
            update = UpdateLimitRequest.model_validate_json(body)
        except ValidationError as exc:
            detail = json.loads(exc.json(include_url=False, include_context=False))
            raise _HttpError(422, "validation", detail) from exc

        def given(name: str, value: OverrideValue) -> OverrideValue | Keep:
            return value if name in update.model_fields_set else KEEP

        book = self.store.book
        merged = merge_override(
            book.override(update.tenant_id, update.operation),
            requests=given("daily_limit", update.daily_limit),
            tokens=given("daily_tokens", update.daily_tokens),
        )
        try:
            partition, offset = await self.publisher.set_limits(
                update.tenant_id,
                update.operation,
                daily_requests=merged.requests,
                daily_tokens=merged.tokens,
                issued_by="admin-api",
            )
        except KafkaError as exc:
            log.error("quota.admin_publish_failed error=%r", exc)
            raise _HttpError(503, "control topic unavailable", repr(exc)) from exc
        log.info(
            "quota.admin_limits_set tenant_id=%s operation=%s requests=%s tokens=%s",
            update.tenant_id,
            update.operation,
            merged.requests,
            merged.tokens,
        )
        if self.follower is not None:
            try:
                await self.follower.wait_applied(partition, offset, timeout_s=10.0)
            except TimeoutError as exc:
                raise _HttpError(504, "limit published but not applied here yet") from exc
        return _json(self._limits_response(update.tenant_id))

    async def _get_usage(self, scope: Scope, receive: Receive) -> AsgiResponse:
        tenant = _query(scope).get("tenant_id")
        try:
            rows = await self.store.usage(tenant_id=tenant)
        except (KafkaError, TimeoutError) as exc:
            log.error("quota.admin_usage_failed error=%r", exc)
            raise _HttpError(503, "state topic unavailable", repr(exc)) from exc
        return _json(
            UsageResponse(
                usage=[
                    OperationUsage(
                        tenant_id=row.tenant_id,
                        operation=row.operation,
                        date=row.day.isoformat(),
                        request_count=row.used.requests,
                        total_tokens=row.used.tokens,
                        daily_limit=row.cap.requests,
                        remaining=remaining(row.cap.requests, row.used.requests),
                        daily_tokens=row.cap.tokens,
                        tokens_remaining=remaining(row.cap.tokens, row.used.tokens),
                        resets_at=row.resets_at,
                    )
                    for row in rows
                ]
            )
        )

    def _limits_response(self, tenant: str | None) -> LimitsResponse:
        book = self.store.book
        if tenant is not None:
            tenants = [tenant]
        else:
            overridden = {t for t, _ in book.overrides()} - {ALL_TENANTS}
            tenants = [ALL_TENANTS, *sorted(overridden)]
        rows = []
        for name in tenants:
            for scope in (*OPERATIONS, TOTAL):
                cap = book.resolve(name, scope)
                chars, tokens = self.caps.get(scope, (None, None))
                rows.append(
                    OperationLimit(
                        tenant_id=name,
                        operation=scope,
                        daily_limit=cap.requests,
                        daily_tokens=cap.tokens,
                        max_input_chars=chars,
                        max_output_tokens=tokens,
                    )
                )
        return LimitsResponse(limits=rows)


def admin_routes(
    store: QuotaStore,
    control_publisher: LimitCommandPublisher,
    settings: QuotaHostSettings,
    follower: LimitFollower | None = None,
) -> list[tuple[str, ASGIApp]]:
    """Routes to add to `AsgiFastStream(asgi_routes=...)`: /limits and /limits/usage.

    Pass the instance's `follower` so PUT /limits answers after the change is applied.
    """
    api = LimitsAdminApi(store, control_publisher, settings, follower)
    return [("/limits", api.limits), ("/limits/usage", api.usage)]

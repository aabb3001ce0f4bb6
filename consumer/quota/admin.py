"""The admin HTTP API for limits (GET/PUT /limits, GET /limits/usage) as FastStream handlers."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka.errors import KafkaError
from faststream.asgi import AsgiResponse, HttpHandler, Request
from faststream.asgi.request import AsgiRequest, ClientDisconnectError
from faststream.asgi.types import Receive, Scope, Send
from pydantic import ValidationError

from consumer.json_response import json_response
from consumer.quota.control import LimitCommandPublisher, LimitFollower
from consumer.quota.limit_book import KEEP, Keep, OverrideValue, merge_override, remaining
from consumer.quota.store import QuotaStore
from consumer.settings import Settings
from schemas.quota import (
    ALL_TENANTS,
    TOTAL,
    ErrorResponse,
    LimitsResponse,
    OperationLimit,
    OperationUsage,
    UpdateLimitRequest,
    UsageResponse,
)
from schemas.requests import OPERATION_LIMITS, OPERATIONS

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024


class _HttpError(Exception):
    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail


class AdminHandler(HttpHandler):
    """FastStream's HTTP handler, answering a method it does not serve with a JSON error."""

    def __init__(
        self, func: Callable[[AsgiRequest], Awaitable[AsgiResponse]], *methods: str
    ) -> None:
        super().__init__(func, methods=methods, include_in_schema=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in self.methods:
            await super().__call__(scope, receive, send)
            return
        allow = {"Allow": ", ".join(self.methods)}
        await json_response(ErrorResponse(error="method not allowed"), 405, allow)(
            scope, receive, send
        )


def _query(request: AsgiRequest, name: str) -> str | None:
    values = request.query_params.get(name)
    return values[-1] if values else None


async def _read_body(request: AsgiRequest) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _HttpError(413, "request body too large", {"max_bytes": MAX_BODY_BYTES})
            chunks.append(chunk)
    except ClientDisconnectError as exc:
        raise _HttpError(400, "client disconnected") from exc
    return b"".join(chunks)


class LimitsAdminApi:
    """Handlers of the limits admin API, guarded by `settings.quota.admin_key`."""

    def __init__(
        self,
        store: QuotaStore,
        publisher: LimitCommandPublisher,
        settings: Settings,
        follower: LimitFollower | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.follower = follower
        self.admin_key = settings.quota.admin_key
        # The contract's per-request caps, shown by GET /limits as in the original
        # platform; chat's come from settings.
        self.caps = {
            name: (limit.max_input_chars, limit.max_output_tokens)
            for name, limit in OPERATION_LIMITS.items()
        }
        self.caps["chat"] = (
            settings.limits.chat_max_input_chars,
            settings.limits.chat_max_output_tokens,
        )

    async def limits(self, request: Request) -> AsgiResponse:
        """GET /limits (effective limits) and PUT /limits (change one override)."""
        put = request.method == "PUT"
        return await self._answer(request, self._put_limits if put else self._get_limits)

    async def usage(self, request: Request) -> AsgiResponse:
        """GET /limits/usage: today's counts and what is left, per tenant and operation."""
        return await self._answer(request, self._get_usage)

    # ── plumbing ──

    async def _answer(
        self, request: AsgiRequest, handler: Callable[[AsgiRequest], Awaitable[AsgiResponse]]
    ) -> AsgiResponse:
        try:
            self._authorize(request)
            return await handler(request)
        except _HttpError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            return json_response(
                ErrorResponse(error=exc.error, detail=exc.detail), exc.status, headers
            )

    def _authorize(self, request: AsgiRequest) -> None:
        if self.admin_key is None:
            raise _HttpError(403, "admin API disabled", "set OPSTREAM_QUOTA__ADMIN_KEY to enable")
        given = request.headers.get("x-admin-key")
        if given is None:
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else None
        expected = self.admin_key.get_secret_value().encode()
        if not given or not hmac.compare_digest(given.encode(), expected):
            raise _HttpError(401, "unauthorized", "missing or wrong admin key")

    # ── handlers ──

    async def _get_limits(self, request: AsgiRequest) -> AsgiResponse:
        return json_response(self._limits_response(_query(request, "tenant_id")))

    async def _put_limits(self, request: AsgiRequest) -> AsgiResponse:
        body = await _read_body(request)
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
            log.error("quota_admin_publish_failed", extra={"error": repr(exc)[:300]})
            raise _HttpError(503, "control topic unavailable", repr(exc)) from exc
        log.info(
            "quota_admin_limits_set",
            extra={
                "tenant_id": update.tenant_id,
                "operation": update.operation,
                "requests": merged.requests,
                "tokens": merged.tokens,
            },
        )
        if self.follower is not None:
            try:
                await self.follower.wait_applied(partition, offset, timeout_s=10.0)
            except TimeoutError as exc:
                raise _HttpError(504, "limit published but not applied here yet") from exc
        return json_response(self._limits_response(update.tenant_id))

    async def _get_usage(self, request: AsgiRequest) -> AsgiResponse:
        try:
            rows = await self.store.usage(tenant_id=_query(request, "tenant_id"))
        except (KafkaError, TimeoutError) as exc:
            log.error("quota_admin_usage_failed", extra={"error": repr(exc)[:300]})
            raise _HttpError(503, "state topic unavailable", repr(exc)) from exc
        return json_response(
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
    settings: Settings,
    follower: LimitFollower | None = None,
) -> list[tuple[str, AdminHandler]]:
    """Routes to add to `AsgiFastStream(asgi_routes=...)`: /limits and /limits/usage.

    Serve them through that app: it is what hands each handler its `Request`. Pass the
    instance's `follower` so PUT /limits answers after the change is applied.
    """
    api = LimitsAdminApi(store, control_publisher, settings, follower)
    return [
        ("/limits", AdminHandler(api.limits, "GET", "PUT")),
        ("/limits/usage", AdminHandler(api.usage, "GET")),
    ]

"""The limits admin HTTP API and the `opstream limits` commands against a real broker."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio
from faststream.asgi import AsgiFastStream
from pydantic import SecretStr

from consumer.bus.connection import KafkaConnection
from consumer.cli.limits import register
from consumer.errors import QuotaExceeded
from consumer.quota import (
    LimitBook,
    LimitCommandPublisher,
    LimitFollower,
    QuotaSettings,
    QuotaStore,
    admin_routes,
    load_limit_book,
    make_state_producer,
    partition_for_tenant,
)
from consumer.quota.limit_book import limit_defaults
from consumer.settings import (
    KafkaSecuritySettings,
    KafkaSettings,
    OperationLimits,
    TopicSettings,
)
from tests.support.harness import (
    FETCH_MAX_WAIT_MS,
    Broker,
    create_topic,
    unique_topic,
)

pytestmark = pytest.mark.integration

NOON = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
KEY = "s3cret-admin-key"


def host_settings(bootstrap: str, quota: QuotaSettings) -> Any:
    """What quota code reads from the app's Settings (the lead nests QuotaSettings there)."""
    return SimpleNamespace(
        quota=quota,
        kafka=KafkaSettings(bootstrap_servers=bootstrap, fetch_max_wait_ms=FETCH_MAX_WAIT_MS),
        security=KafkaSecuritySettings(),
        limits=OperationLimits(),
        topics=TopicSettings(request_partitions=2),
    )


async def make_topics(bootstrap: str, admin_key: str | None = KEY) -> QuotaSettings:
    quota = QuotaSettings(
        default_daily_requests=2,
        state_topic=unique_topic("test.quota.state"),
        control_topic=unique_topic("test.control"),
        admin_key=SecretStr(admin_key) if admin_key else None,
    )
    await create_topic(bootstrap, quota.state_topic, 2, {"cleanup.policy": "compact,delete"})
    await create_topic(bootstrap, quota.control_topic, 1, {"cleanup.policy": "compact"})
    return quota


@dataclass
class Api:
    app: AsgiFastStream  # serves /limits and /limits/usage, as the service does
    store: QuotaStore
    book: LimitBook


@pytest_asyncio.fixture
async def api(broker: Broker) -> AsyncIterator[Api]:
    quota = await make_topics(broker.bootstrap)
    book = LimitBook(limit_defaults(quota))
    producer = make_state_producer(KafkaConnection(broker.bootstrap))
    await producer.start()
    follower = LimitFollower(
        book,
        connection=KafkaConnection(broker.bootstrap),
        topic=quota.control_topic,
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
    )
    await follower.start()
    store = QuotaStore(
        book=book,
        settings=quota,
        producer=producer,
        connection=KafkaConnection(broker.bootstrap),
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        clock=lambda: NOON,
    )
    routes = admin_routes(
        store,
        LimitCommandPublisher(producer, quota.control_topic),
        host_settings(broker.bootstrap, quota),
        follower,
    )
    try:
        yield Api(AsgiFastStream(asgi_routes=routes), store, book)
    finally:
        await follower.stop()
        await producer.stop()


async def call(
    app: AsgiFastStream,
    method: str,
    path: str,
    *,
    body: Any = None,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One HTTP exchange with an ASGI app, without a server."""
    raw = b"" if body is None else json.dumps(body).encode()
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], json.loads(payload) if payload else {}


AUTH = {"X-Admin-Key": KEY}


async def test_admin_api_requires_the_admin_key(api: Api) -> None:
    status, body = await call(api.app, "GET", "/limits")
    assert (status, body["error"]) == (401, "unauthorized")
    status, _ = await call(api.app, "GET", "/limits", headers={"X-Admin-Key": "wrong"})
    assert status == 401
    status, _ = await call(
        api.app, "GET", "/limits/usage", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert status == 200


async def test_admin_api_is_off_without_a_configured_key(broker: Broker) -> None:
    quota = await make_topics(broker.bootstrap, admin_key=None)
    store = QuotaStore(
        book=LimitBook(limit_defaults(quota)),
        settings=quota,
        producer=make_state_producer(KafkaConnection(broker.bootstrap)),
        connection=KafkaConnection(broker.bootstrap),
    )
    routes = admin_routes(store, None, host_settings(broker.bootstrap, quota))  # type: ignore[arg-type]
    status, body = await call(AsgiFastStream(asgi_routes=routes), "GET", "/limits", headers=AUTH)
    assert (status, body["error"]) == (403, "admin API disabled")


async def test_get_limits_has_the_original_shape_plus_tenant(api: Api) -> None:
    status, body = await call(api.app, "GET", "/limits", headers=AUTH)
    assert status == 200
    rows = {(r["tenant_id"], r["operation"]): r for r in body["limits"]}
    assert rows[("*", "summarize")] == {
        "tenant_id": "*",
        "operation": "summarize",
        "daily_limit": 2,
        "daily_tokens": None,
        "max_input_chars": 8000,
        "max_output_tokens": 512,
    }
    assert rows[("*", "*")]["daily_limit"] is None


async def test_put_limits_applies_on_this_instance_before_answering(api: Api) -> None:
    status, body = await call(
        api.app,
        "PUT",
        "/limits",
        body={"tenant_id": "acme", "operation": "chat", "daily_limit": 9},
        headers=AUTH,
    )
    assert status == 200
    chat = next(r for r in body["limits"] if r["operation"] == "chat")
    assert (chat["tenant_id"], chat["daily_limit"], chat["daily_tokens"]) == ("acme", 9, None)
    assert api.book.resolve("acme", "chat").requests == 9

    # an omitted field keeps its value; null falls back to the default
    await call(
        api.app,
        "PUT",
        "/limits",
        body={"tenant_id": "acme", "operation": "chat", "daily_tokens": 500},
        headers=AUTH,
    )
    assert (api.book.resolve("acme", "chat").requests, api.book.resolve("acme", "chat").tokens) == (
        9,
        500,
    )
    await call(
        api.app,
        "PUT",
        "/limits",
        body={"tenant_id": "acme", "operation": "chat", "daily_limit": None},
        headers=AUTH,
    )
    assert api.book.resolve("acme", "chat").requests == 2

    status, body = await call(api.app, "GET", "/limits", query="tenant_id=acme", headers=AUTH)
    assert {r["tenant_id"] for r in body["limits"]} == {"acme"}


async def test_put_limits_rejects_a_bad_body(api: Api) -> None:
    status, body = await call(
        api.app,
        "PUT",
        "/limits",
        body={"operation": "dance", "daily_limit": -1},
        headers=AUTH,
    )
    assert status == 422 and body["error"] == "validation"
    status, body = await call(
        api.app, "PUT", "/limits", body={"tenant_id": "x" * 70_000}, headers=AUTH
    )
    assert (status, body["error"]) == (413, "request body too large")
    status, body = await call(api.app, "DELETE", "/limits", headers=AUTH)
    assert (status, body["error"]) == (405, "method not allowed")


async def test_usage_shows_todays_counts_and_remaining(api: Api) -> None:
    tenant = next(f"t{n}" for n in range(100) if partition_for_tenant(f"t{n}", 2) == 1)
    await api.store.restore({0, 1})
    reservation = api.store.reserve(1, tenant, "translate", "r1", 10, 100)
    api.store.settle(reservation, 10, 20)
    status, body = await call(
        api.app, "GET", "/limits/usage", query=f"tenant_id={tenant}", headers=AUTH
    )
    assert status == 200
    row = next(r for r in body["usage"] if r["operation"] == "translate")
    assert row == {
        "tenant_id": tenant,
        "operation": "translate",
        "date": "2025-03-10",
        "request_count": 1,
        "total_tokens": 30,
        "daily_limit": 2,
        "remaining": 1,
        "daily_tokens": None,
        "tokens_remaining": None,
        "resets_at": "2025-03-11T00:00:00Z",
    }
    assert "generated_at" in body


# ── the command line ──


def run_cli(settings: Any, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="opstream")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub, argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(list(argv))
    result: int = args.func(args, settings)
    return result


@pytest.fixture
def cli_settings(broker: Broker) -> Any:
    import asyncio

    quota = asyncio.run(make_topics(broker.bootstrap))
    return host_settings(broker.bootstrap, quota)


def test_limits_set_then_show_reads_the_control_topic(
    cli_settings: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(cli_settings, "limits", "set", "--tenant", "acme", "--operation", "chat",
                   "--daily-requests", "40") == 0  # fmt: skip
    assert run_cli(cli_settings, "limits", "set", "--tenant", "acme", "--operation", "chat",
                   "--daily-tokens", "unlimited") == 0  # fmt: skip
    capsys.readouterr()
    assert run_cli(cli_settings, "limits", "show", "--tenant", "acme", "--json") == 0
    rows = {r["operation"]: r for r in json.loads(capsys.readouterr().out)}
    assert (rows["chat"]["daily_requests"], rows["chat"]["daily_requests_from"]) == (40, "tenant")
    assert rows["chat"]["daily_tokens"] is None
    assert (rows["summarize"]["daily_requests"], rows["summarize"]["daily_requests_from"]) == (
        2,
        "settings",
    )


def test_limits_set_needs_a_value_and_a_broker(cli_settings: Any) -> None:
    assert run_cli(cli_settings, "limits", "set", "--tenant", "a", "--operation", "chat") == 2
    no_broker = SimpleNamespace(**{**vars(cli_settings), "kafka": KafkaSettings()})
    assert run_cli(no_broker, "limits", "show") == 2


def test_limits_reset_publishes_a_reset_for_today(cli_settings: Any) -> None:
    import asyncio

    assert run_cli(cli_settings, "limits", "reset", "--tenant", "acme", "--day", "2025-03-10") == 0
    book = asyncio.run(
        load_limit_book(
            limit_defaults(cli_settings.quota),
            connection=KafkaConnection(cli_settings.kafka.bootstrap_servers),
            topic=cli_settings.quota.control_topic,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
    )
    assert book.reset_epoch("acme", NOON.date()) is not None


async def test_runtime_wires_follower_store_and_admin_routes(broker: Broker) -> None:
    from consumer.quota import QuotaRuntime

    quota = await make_topics(broker.bootstrap)
    runtime = QuotaRuntime(
        host_settings(broker.bootstrap, quota),
        KafkaConnection(broker.bootstrap),
        clock=lambda: NOON,
    )
    await runtime.start()
    try:
        await runtime.store.restore({0, 1})
        status, _ = await call(
            AsgiFastStream(asgi_routes=runtime.admin_routes()),
            "PUT",
            "/limits",
            body={"tenant_id": "acme", "operation": "*", "daily_limit": 1},
            headers=AUTH,
        )
        assert status == 200
        home = partition_for_tenant("acme", 2)
        runtime.store.reserve(home, "acme", "chat", "r1", 0, 0)
        with pytest.raises(QuotaExceeded) as caught:
            runtime.store.reserve(home, "acme", "summarize", "r2", 0, 0)
        assert caught.value.details["limit_name"] == "total.requests"
        await runtime.store.persist(home)
    finally:
        await runtime.stop()

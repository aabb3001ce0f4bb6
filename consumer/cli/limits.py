"""`opstream limits show|set|reset`: read and change daily limits through the control topic."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import date
from typing import Any

from pydantic import ValidationError

from consumer.bus.connection import KafkaConnection
from consumer.cli.table import print_table
from consumer.quota.days import day_of
from consumer.quota.limit_book import (
    KEEP,
    Keep,
    LimitBook,
    OverrideValue,
    limit_defaults,
    merge_override,
)
from consumer.settings import Settings
from schemas.quota import ALL_TENANTS, TOTAL, UNLIMITED
from schemas.requests import OPERATIONS

_SCOPES = (*OPERATIONS, TOTAL)


def _limit_value(text: str) -> OverrideValue:
    """N, "unlimited", or "default" (drop the override of this field)."""
    lowered = text.strip().lower()
    if lowered == "default":
        return None
    if lowered == UNLIMITED:
        return "unlimited"
    try:
        value = int(lowered)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count, 'unlimited' or 'default', got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError("a limit cannot be negative")
    return value


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add `opstream limits ...` to the command line."""
    # `common` goes on the leaves only: argparse lets a subparser's defaults overwrite
    # options its parent already parsed.
    limits = subparsers.add_parser("limits", help="show and change per-tenant daily quotas")
    actions = limits.add_subparsers(dest="limits_command", required=True, metavar="ACTION")

    show = actions.add_parser("show", help="effective daily limits", parents=[common])
    show.add_argument("--tenant", default=None, help="one tenant's effective limits")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=show_limits)

    set_ = actions.add_parser(
        "set",
        help="override a tenant's daily limits (applies on every instance within seconds)",
        parents=[common],
    )
    set_.add_argument("--tenant", required=True, help=f"tenant id, or {ALL_TENANTS!r} for all")
    set_.add_argument(
        "--operation", required=True, choices=_SCOPES, help=f"{TOTAL!r}: all operations together"
    )
    for flag in ("--daily-requests", "--daily-tokens"):
        set_.add_argument(
            flag,
            type=_limit_value,
            default=KEEP,
            metavar="N|unlimited|default",
            help="omitted: unchanged; default: fall back to the default",
        )
    set_.set_defaults(func=set_limits)

    reset = actions.add_parser(
        "reset", help="start a tenant's counters for today again", parents=[common]
    )
    reset.add_argument("--tenant", required=True)
    reset.add_argument(
        "--day", type=date.fromisoformat, default=None, help="YYYY-MM-DD (default: today)"
    )
    reset.set_defaults(func=reset_usage)


def _connection(settings: Settings) -> KafkaConnection | None:
    servers = settings.kafka.bootstrap_servers
    if not servers:
        print(
            "opstream limits: no broker; set --bootstrap-servers or "
            "OPSTREAM_KAFKA__BOOTSTRAP_SERVERS",
            file=sys.stderr,
        )
        return None
    return KafkaConnection.of(servers, settings.security)


async def _load_book(settings: Settings, connection: KafkaConnection) -> LimitBook:
    from consumer.quota.control import load_limit_book

    return await load_limit_book(
        limit_defaults(settings.quota),
        connection=connection,
        topic=settings.quota.control_topic,
        fetch_max_wait_ms=min(settings.kafka.fetch_max_wait_ms, 100),
    )


def _run(coro: Any) -> int:
    from aiokafka.errors import KafkaError

    from consumer.bus.topic_reader import TopicUnavailable

    try:
        result: int = asyncio.run(coro)
    except ValidationError as exc:
        print(f"opstream limits: invalid command: {exc}", file=sys.stderr)
        return 2
    except (KafkaError, TopicUnavailable, TimeoutError) as exc:
        print(f"opstream limits: {exc}", file=sys.stderr)
        return 1
    return result


def _fmt(value: int | None) -> str:
    return UNLIMITED if value is None else str(value)


def _rows(book: LimitBook, tenant: str | None) -> list[dict[str, Any]]:
    if tenant is not None:
        tenants = [tenant]
    else:
        tenants = [ALL_TENANTS, *sorted({t for t, _ in book.overrides()} - {ALL_TENANTS})]
    rows = []
    for name in tenants:
        for scope in _SCOPES:
            cap, (requests_from, tokens_from) = book.resolve_with_sources(name, scope)
            rows.append(
                {
                    "tenant_id": name,
                    "operation": scope,
                    "daily_requests": cap.requests,
                    "daily_tokens": cap.tokens,
                    "daily_requests_from": requests_from,
                    "daily_tokens_from": tokens_from,
                }
            )
    return rows


def _print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print_table(
        ["TENANT", "OPERATION", "DAILY REQUESTS", "DAILY TOKENS"],
        [
            [
                row["tenant_id"],
                row["operation"],
                f"{_fmt(row['daily_requests'])} ({row['daily_requests_from']})",
                f"{_fmt(row['daily_tokens'])} ({row['daily_tokens_from']})",
            ]
            for row in rows
        ],
    )


def show_limits(args: argparse.Namespace, settings: Settings) -> int:
    """`opstream limits show`: effective limits as the control topic says now."""
    connection = _connection(settings)
    if connection is None:
        return 2

    async def run() -> int:
        book = await _load_book(settings, connection)
        _print_rows(_rows(book, args.tenant), args.json)
        return 0

    return _run(run())


def set_limits(args: argparse.Namespace, settings: Settings) -> int:
    """`opstream limits set`: publish an override; every instance applies it."""
    connection = _connection(settings)
    if connection is None:
        return 2
    requests: OverrideValue | Keep = args.daily_requests
    tokens: OverrideValue | Keep = args.daily_tokens
    if isinstance(requests, Keep) and isinstance(tokens, Keep):
        print("opstream limits set: give --daily-requests and/or --daily-tokens", file=sys.stderr)
        return 2

    async def run() -> int:
        from consumer.quota.control import LimitCommandPublisher
        from consumer.quota.store import make_state_producer

        book = await _load_book(settings, connection)
        merged = merge_override(
            book.override(args.tenant, args.operation), requests=requests, tokens=tokens
        )
        producer = make_state_producer(connection)
        await producer.start()
        try:
            await LimitCommandPublisher(producer, settings.quota.control_topic).set_limits(
                args.tenant,
                args.operation,
                daily_requests=merged.requests,
                daily_tokens=merged.tokens,
                issued_by="cli",
            )
        finally:
            await producer.stop()
        book.set_override(args.tenant, args.operation, merged)
        _print_rows(
            [r for r in _rows(book, args.tenant) if r["operation"] == args.operation], False
        )
        return 0

    return _run(run())


def reset_usage(args: argparse.Namespace, settings: Settings) -> int:
    """`opstream limits reset`: the tenant's counters for the day start again from zero."""
    connection = _connection(settings)
    if connection is None:
        return 2
    from consumer.quota.control import LimitCommandPublisher
    from consumer.quota.store import make_state_producer, offset_clock

    now = offset_clock(settings.quota.clock_offset_s)()
    day: date = args.day or day_of(now, settings.quota.zone())

    async def run() -> int:
        producer = make_state_producer(connection)
        await producer.start()
        try:
            await LimitCommandPublisher(producer, settings.quota.control_topic).reset_usage(
                args.tenant, day, issued_by="cli"
            )
        finally:
            await producer.stop()
        print(f"reset {args.tenant} for {day.isoformat()}")
        return 0

    return _run(run())

"""`opstream run`: the consumer against a configured Kafka cluster, and the HTTP options it
shares with `opstream dev`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from consumer.settings import Settings


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add `opstream run` to the command line."""
    run = subparsers.add_parser(
        "run", parents=[common], help="run the consumer against a Kafka cluster"
    )
    add_http_options(run)
    run.set_defaults(func=cmd_run)


def add_http_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http-host", default=None, help="health/metrics/admin bind address")
    parser.add_argument("--http-port", type=int, default=None, help="health/metrics/admin port")
    parser.set_defaults(settings_overrides=[http_overrides])


def http_overrides(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    http = overrides.setdefault("http", {})
    if args.http_host is not None:
        http["host"] = args.http_host
    if args.http_port is not None:
        http["port"] = args.http_port


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the consumer until SIGTERM/SIGINT; exit 0 after a graceful shutdown."""
    from consumer.observability.logging import configure_logging

    if not settings.kafka.bootstrap_servers:
        print(
            "opstream run: set --bootstrap-servers or OPSTREAM_KAFKA__BOOTSTRAP_SERVERS "
            "(or use `opstream dev` for an embedded broker)",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings.logging)
    from consumer.cli.server import serve

    asyncio.run(serve(settings))
    return 0

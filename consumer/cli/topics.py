"""`opstream topics ensure`: every topic the service needs, created when missing, and a report."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from consumer.cli.table import print_table
from consumer.settings import Settings


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add `opstream topics ensure` to the command line."""
    topics = subparsers.add_parser("topics", help="manage opstream's topics")
    actions = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    ensure = actions.add_parser(
        "ensure", parents=[common], help="create missing topics (idempotent) and report"
    )
    ensure.set_defaults(func=cmd_topics_ensure)


def all_topic_specs(settings: Settings) -> list[Any]:
    """Every topic the service needs: requests, replies, DLQ, quota state and control."""
    from topics.catalog import core_topics, quota_topics

    specs = core_topics(settings.topics)
    specs += quota_topics(
        settings.topics,
        state_topic=settings.quota.state_topic,
        control_topic=settings.quota.control_topic,
        state_retention_ms=settings.quota.state_retention_ms,
    )
    return specs


async def ensure_all_topics(settings: Settings) -> list[Any]:
    """Create the missing topics of `all_topic_specs`; what each one's state was."""
    from consumer.bus.security import aiokafka_security_kwargs
    from topics.ensure import ensure_topics

    assert settings.kafka.bootstrap_servers
    return await ensure_topics(
        settings.kafka.bootstrap_servers,
        all_topic_specs(settings),
        client_kwargs=aiokafka_security_kwargs(settings.security),
    )


def report_topics(results: list[Any], settings: Settings) -> int:
    """Print a table of `results`; 1 when a co-partitioned topic has the wrong count."""
    bad = 0
    rows = []
    for r in results:
        note = ""
        if r.action == "exists-different-partitions":
            note = f"expected {r.expected_partitions}"
            if r.name in (settings.topics.requests, settings.quota.state_topic):
                bad += 1
                note += ": requests and quota state must have the same partition count"
        rows.append([r.name, r.action, r.partitions, note])
    print_table(["TOPIC", "ACTION", "PARTITIONS", "NOTE"], rows, right={2})
    return 1 if bad else 0


def cmd_topics_ensure(args: argparse.Namespace, settings: Settings) -> int:
    """Create missing topics; exit 1 when a co-partitioned topic has the wrong count."""
    if not settings.kafka.bootstrap_servers:
        print("opstream topics ensure: --bootstrap-servers is required", file=sys.stderr)
        return 2
    results = asyncio.run(ensure_all_topics(settings))
    return report_topics(results, settings)

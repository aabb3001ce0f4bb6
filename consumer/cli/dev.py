"""`opstream dev`: an embedded broker (unless one is given), the topics and the consumer,
with a banner that says what runs and how to send it a request."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

from consumer.cli.run import add_http_options, http_overrides
from consumer.settings import Settings


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add `opstream dev` to the command line."""
    dev = subparsers.add_parser(
        "dev",
        parents=[common],
        help="local run: embedded broker (unless --bootstrap-servers), topics, consumer",
    )
    add_http_options(dev)
    dev.add_argument(
        "--require-auth",
        action="store_true",
        help="check tenant signatures as production does (dev turns them off by default)",
    )
    dev.set_defaults(func=cmd_dev, settings_overrides=[_dev_overrides])


def _dev_overrides(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    http_overrides(args, overrides)
    overrides["profile"] = "dev"
    # The embedded broker holds every fetch for the whole wait; keep replies snappy.
    overrides.setdefault("kafka", {}).setdefault("fetch_max_wait_ms", 5)
    if not args.require_auth:
        overrides.setdefault("auth", {})["required"] = False


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    """Embedded broker (when none is configured), topics, consumer; Ctrl-C stops all of it."""
    from consumer.bus.devbroker import start_local_broker
    from consumer.cli.server import serve
    from consumer.cli.topics import ensure_all_topics, report_topics
    from consumer.observability.logging import configure_logging
    from consumer.settings.observability import LoggingSettings

    logging_settings = settings.logging
    if "format" not in settings.logging.model_fields_set:
        logging_settings = LoggingSettings(**{**settings.logging.model_dump(), "format": "console"})
        settings = settings.model_copy(update={"logging": logging_settings})
    configure_logging(logging_settings)
    started = time.monotonic()
    broker = None
    if not settings.kafka.bootstrap_servers:
        broker = start_local_broker()
        settings = settings.model_copy(
            update={
                "kafka": settings.kafka.model_copy(
                    update={"bootstrap_servers": broker.bootstrap_servers}
                )
            }
        )
    try:
        results = asyncio.run(ensure_all_topics(settings))
        if any(r.action == "exists-different-partitions" for r in results):
            report_topics(results, settings)  # the table only when something needs a look
        print(dev_banner(settings, results, embedded=broker is not None), flush=True)

        def announce() -> None:
            print(
                f"opstream dev: ready after {time.monotonic() - started:.0f} s; "
                "send the request above from another terminal (Ctrl-C stops)",
                flush=True,
            )

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(settings, announce))
        print(f"opstream dev: stopped after {time.monotonic() - started:.0f} s")
    finally:
        if broker is not None:
            broker.stop()
    return 0


def dev_banner(settings: Settings, topics: list[Any], *, embedded: bool) -> str:
    """What `opstream dev` runs and how to use it, in one block (printed before startup)."""
    from consumer.engine.factory import choose_backend
    from consumer.engine.model_files import describe_gguf

    servers = settings.kafka.bootstrap_servers
    created = sum(1 for t in topics if t.action == "created")
    broker = f"{servers} ({'embedded Tansu, in memory' if embedded else 'configured'}); "
    broker += f"{len(topics)} topics, {created} created"
    if choose_backend(settings) == "exllamav2":
        model = f"exllamav2 on the GPU: {settings.engine.exllamav2.model_dir}"
    else:
        cfg = settings.engine.llamacpp
        model = "llama.cpp on the CPU: " + describe_gguf(cfg.model_path, cfg.hf_repo, cfg.hf_file)
    if settings.auth.required:
        auth = "on: requests must be signed (opstream keys new --tenant demo)"
    else:
        auth = "OFF: signatures are not checked (dev default; --require-auth checks them)"
    usage = "off"
    if settings.usage.enabled:
        catalog = (settings.usage.directory / "usage.duckdb").resolve()
        usage = f"{catalog} (opstream usage report --by tenant)"
    http = f"http://{settings.http.host}:{settings.http.port}"
    rows = [
        ("broker", broker),
        ("model", model),
        ("auth", auth),
        ("usage", usage),
        ("http", f"{http}/health  {http}/metrics"),
        (
            "try",
            f"opstream request summarize --bootstrap-servers {servers} --tenant demo "
            '--text "Kafka is a distributed log. It stores records."',
        ),
    ]
    return "\n".join(["opstream dev", *(f"  {name:<7}{value}" for name, value in rows)]) + "\n"

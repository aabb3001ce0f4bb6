"""`opstream run | dev | topics ensure | request | schema`: the service's own subcommands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from consumer.cli.table import print_table
from consumer.settings import Settings


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add the core subcommands to the `opstream` command line."""
    run = subparsers.add_parser(
        "run", parents=[common], help="run the consumer against a Kafka cluster"
    )
    _add_http_options(run)
    run.set_defaults(func=cmd_run)

    dev = subparsers.add_parser(
        "dev",
        parents=[common],
        help="local run: embedded broker (unless --bootstrap-servers), topics, consumer",
    )
    _add_http_options(dev)
    dev.add_argument(
        "--require-auth",
        action="store_true",
        help="check tenant signatures as production does (dev turns them off by default)",
    )
    dev.set_defaults(func=cmd_dev, settings_overrides=[_dev_overrides])

    topics = subparsers.add_parser("topics", help="manage opstream's topics")
    actions = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    ensure = actions.add_parser(
        "ensure", parents=[common], help="create missing topics (idempotent) and report"
    )
    ensure.set_defaults(func=cmd_topics_ensure)

    request = subparsers.add_parser(
        "request", help="send one operation request and print the reply JSON"
    )
    ops = request.add_subparsers(dest="operation", required=True, metavar="OPERATION")
    for name, helptext in (
        ("summarize", "summarize --text"),
        ("translate", "translate --text into --target-language"),
        ("classify", "classify --text into one of --category (repeat it)"),
        ("chat", "chat: --text is the user's message (or --message role:content, repeated)"),
        ("cancel", "cancel the tenant's request --request-id"),
    ):
        op = ops.add_parser(name, parents=[common], help=helptext)
        _add_request_options(op, name)
        op.set_defaults(func=cmd_request)

    schema = subparsers.add_parser(
        "schema", parents=[common], help="write JSON Schema files and the AsyncAPI document"
    )
    schema.add_argument("--out", type=Path, required=True, help="directory to write into")
    schema.set_defaults(func=cmd_schema)


def _add_http_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http-host", default=None, help="health/metrics/admin bind address")
    parser.add_argument("--http-port", type=int, default=None, help="health/metrics/admin port")
    parser.set_defaults(settings_overrides=[_http_overrides])


def _http_overrides(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    http = overrides.setdefault("http", {})
    if args.http_host is not None:
        http["host"] = args.http_host
    if args.http_port is not None:
        http["port"] = args.http_port


def _dev_overrides(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    _http_overrides(args, overrides)
    overrides["profile"] = "dev"
    # The embedded broker holds every fetch for the whole wait; keep replies snappy.
    overrides.setdefault("kafka", {}).setdefault("fetch_max_wait_ms", 5)
    if not args.require_auth:
        overrides.setdefault("auth", {})["required"] = False


def _add_request_options(parser: argparse.ArgumentParser, operation: str) -> None:
    parser.add_argument("--tenant", required=True, help="tenant_id")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (120)")
    parser.add_argument("--key-id", default=None, help="signing key id (else from auth keys)")
    parser.add_argument("--secret", default=None, help="signing secret (else from auth keys)")
    if operation == "cancel":
        parser.add_argument("--request-id", required=True, help="the request to cancel")
        return
    parser.add_argument("--text", default=None, help="the input text (chat: the user message)")
    parser.add_argument("--request-id", default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument(
        "--priority", choices=("interactive", "batch"), default=None, help="(interactive)"
    )
    if operation != "classify":
        parser.add_argument(
            "--stream", action="store_true", help="print the text as it is generated"
        )
    if operation == "summarize":
        parser.add_argument("--max-sentences", type=int, default=None)
    if operation == "translate":
        parser.add_argument("--target-language", required=True)
        parser.add_argument("--source-language", default=None)
    if operation == "classify":
        parser.add_argument("--category", action="append", required=True, dest="categories")
    if operation == "chat":
        parser.add_argument(
            "--message",
            action="append",
            default=[],
            help="role:content, in order (system/user/assistant)",
        )


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The request JSON for the `opstream request` arguments."""
    operation = args.operation
    body: dict[str, Any] = {"operation": operation, "tenant_id": args.tenant}
    if args.request_id:
        body["request_id"] = args.request_id
    if operation == "cancel":
        return body
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.priority is not None:
        body["priority"] = args.priority
    if operation == "chat":
        messages = []
        for item in args.message:
            role, sep, content = item.partition(":")
            if not sep:
                raise ValueError(f"--message must be role:content, got {item[:40]!r}")
            messages.append({"role": role.strip(), "content": content})
        if args.text is not None:
            messages.append({"role": "user", "content": args.text})
        body["messages"] = messages
        return body
    if args.text is None:
        raise ValueError(f"{operation} needs --text")
    body["text"] = args.text
    if operation == "summarize" and args.max_sentences is not None:
        body["max_sentences"] = args.max_sentences
    if operation == "translate":
        body["target_language"] = args.target_language
        if args.source_language:
            body["source_language"] = args.source_language
    if operation == "classify":
        body["categories"] = args.categories
    return body


def tenant_keys(settings: Settings) -> dict[str, tuple[str, str]]:
    """Each tenant's first signing key (key id, secret): settings, then the keys file."""
    from consumer.auth.keys import read_keys_file

    keys = {tenant: list(found) for tenant, found in settings.auth.keys.items()}
    if settings.auth.keys_file is not None and settings.auth.keys_file.is_file():
        for tenant, found in read_keys_file(settings.auth.keys_file).items():
            keys.setdefault(tenant, []).extend(found)
    return {
        tenant: (found[0].key_id, found[0].secret.get_secret_value())
        for tenant, found in keys.items()
        if found
    }


def _signing_key(args: argparse.Namespace, settings: Settings) -> tuple[str, str] | None:
    if args.key_id and args.secret:
        return args.key_id, args.secret
    if args.key_id or args.secret:
        raise ValueError("give both --key-id and --secret")
    return tenant_keys(settings).get(args.tenant)


def cmd_request(args: argparse.Namespace, settings: Settings) -> int:
    """Send one request, print its reply; exit 0 for `ok`, 1 for an error reply."""
    from consumer.bus.security import aiokafka_security_kwargs
    from opstream_client import OperationsClient

    if not settings.kafka.bootstrap_servers:
        print("opstream request: --bootstrap-servers is required", file=sys.stderr)
        return 2
    try:
        body = request_body(args)
        key = _signing_key(args, settings)
    except ValueError as exc:
        print(f"opstream request: {exc}", file=sys.stderr)
        return 2

    async def send() -> int:
        async with OperationsClient(
            settings.kafka.bootstrap_servers or "",
            request_topic=settings.topics.requests,
            reply_topic=settings.topics.replies,
            timeout_s=args.timeout,
            key_id=key[0] if key else None,
            secret=key[1] if key else None,
            client_options=aiokafka_security_kwargs(settings.security),
        ) as client:
            if getattr(args, "stream", False):
                return await _print_stream(client, body)
            reply = await client.request(body)
        print(reply.model_dump_json(indent=2, exclude_none=True))
        return 0 if reply.status == "ok" else 1

    try:
        return asyncio.run(send())
    except TimeoutError:
        print(f"opstream request: no reply within {args.timeout} s", file=sys.stderr)
        return 3


async def _print_stream(client: Any, body: dict[str, Any]) -> int:
    """Print a streamed reply's text as it arrives; then its status (and error) on stderr."""
    stream = client.stream(body)
    async for chunk in stream:
        sys.stdout.write(chunk.delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    reply = stream.reply
    if reply.status == "ok":
        meta = reply.meta
        print(
            f"[ok: {meta.output_tokens} tokens, {meta.execution_time_ms:.0f} ms, "
            f"request_id {meta.request_id}]",
            file=sys.stderr,
        )
        return 0
    print(reply.model_dump_json(indent=2, exclude_none=True), file=sys.stderr)
    return 1


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
    from consumer.bus.security import aiokafka_security_kwargs
    from topics.ensure import ensure_topics

    assert settings.kafka.bootstrap_servers
    return await ensure_topics(
        settings.kafka.bootstrap_servers,
        all_topic_specs(settings),
        client_kwargs=aiokafka_security_kwargs(settings.security),
    )


def _report_topics(results: list[Any], settings: Settings) -> int:
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
    return _report_topics(results, settings)


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    """Write one JSON Schema per message and the app's AsyncAPI document."""
    from consumer.app import asyncapi_document
    from schemas.export import render, write_schemas

    written = write_schemas(args.out)
    asyncapi = args.out / "asyncapi.json"
    asyncapi.write_text(render(asyncapi_document(settings)), encoding="utf-8")
    for path in [*written, asyncapi]:
        print(path)
    return 0


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
    asyncio.run(serve(settings))
    return 0


async def serve(settings: Settings, announce: Any = None, engine: Any = None) -> None:
    """Serve the app (consumer + HTTP routes) until a signal stops it."""
    import uvicorn

    from consumer.app import build_app

    app = build_app(settings, engine)
    service = app.context.get("service")
    config = uvicorn.Config(
        app,
        host=settings.http.host,
        port=settings.http.port,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.intake.shutdown_grace_s) + 5,
    )
    server = _Server(config)
    watcher = None
    if announce is not None:
        watcher = asyncio.create_task(_announce_when_ready(service, announce))
    try:
        await server.serve()
    finally:
        if watcher is not None:
            watcher.cancel()
    if server.started is False and not server.should_exit:
        raise RuntimeError("the service failed to start (see the log above)")


class _Server:
    """uvicorn's server, except that a handled SIGTERM/SIGINT ends with exit status 0.

    (uvicorn re-raises the signal after a graceful shutdown, so the process would report
    death by signal even though it drained and committed.)
    """

    def __new__(cls, config: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                # uvicorn force-exits on a second SIGINT, skipping the app's shutdown: the
                # in-flight work would then be cancelled mid-drain. Shutdown always drains
                # (bounded by intake.shutdown_grace_s); a repeated signal only says so.
                if self.should_exit:
                    logging.getLogger(__name__).warning(
                        "shutdown_in_progress",
                        extra={"grace_s": config.timeout_graceful_shutdown},
                    )
                    return
                super().handle_exit(sig, frame)

            @contextlib.contextmanager
            def capture_signals(self) -> Any:
                import signal

                loop = asyncio.get_running_loop()
                handled = (signal.SIGINT, signal.SIGTERM)
                for sig in handled:
                    loop.add_signal_handler(sig, self.handle_exit, sig, None)
                try:
                    yield
                finally:
                    for sig in handled:
                        loop.remove_signal_handler(sig)

        return Server(config)


async def _announce_when_ready(service: Any, announce: Any) -> None:
    while True:
        ready, _ = service.health.ready()
        if ready:
            announce()
            return
        await asyncio.sleep(0.5)


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    """Embedded broker (when none is configured), topics, consumer; Ctrl-C stops all of it."""
    from consumer.bus.devbroker import start_local_broker
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
            _report_topics(results, settings)  # the table only when something needs a look
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
    from consumer.engine.models import describe_gguf

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

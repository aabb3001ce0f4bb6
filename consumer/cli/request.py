"""`opstream request OPERATION`: build one request from flags, send it, print the reply."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from consumer.cli.keys import signing_key
from consumer.settings import Settings


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add `opstream request summarize|translate|classify|chat|extract|cancel`."""
    request = subparsers.add_parser(
        "request", help="send one operation request and print the reply JSON"
    )
    ops = request.add_subparsers(dest="operation", required=True, metavar="OPERATION")
    for name, helptext in (
        ("summarize", "summarize --text"),
        ("translate", "translate --text into --target-language"),
        ("classify", "classify --text into one of --category (repeat it)"),
        ("chat", "chat: --text is the user's message (or --message role:content, repeated)"),
        ("extract", "extract fields from --text as JSON valid against --schema FILE"),
        ("cancel", "cancel the tenant's request --request-id"),
    ):
        op = ops.add_parser(name, parents=[common], help=helptext)
        _add_request_options(op, name)
        op.set_defaults(func=cmd_request)


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
        shape = parser.add_mutually_exclusive_group()
        shape.add_argument(
            "--json", action="store_true", help="answer with a JSON object (response_format)"
        )
        shape.add_argument(
            "--schema", type=Path, default=None, help="answer with JSON valid against this schema"
        )
    if operation == "extract":
        parser.add_argument(
            "--schema", type=Path, required=True, help="JSON Schema file the result follows"
        )
        parser.add_argument("--instructions", default=None, help="what to extract, in words")


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
        if args.schema is not None:
            body["response_format"] = {"type": "json_schema", "schema": _schema(args.schema)}
        elif args.json:
            body["response_format"] = {"type": "json_object"}
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
    if operation == "extract":
        body["schema"] = _schema(args.schema)
        if args.instructions:
            body["instructions"] = args.instructions
    return body


def _schema(path: Path) -> Any:
    """The JSON Schema in `path` (`-`: standard input)."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
        return json.loads(text)
    except OSError as exc:
        raise ValueError(f"cannot read --schema {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"--schema {path} is not JSON: {exc}") from None


def cmd_request(args: argparse.Namespace, settings: Settings) -> int:
    """Send one request, print its reply; exit 0 for `ok`, 1 for an error reply."""
    from consumer.bus.security import aiokafka_security_kwargs
    from opstream_client import OperationsClient

    if not settings.kafka.bootstrap_servers:
        print("opstream request: --bootstrap-servers is required", file=sys.stderr)
        return 2
    try:
        body = request_body(args)
        key = signing_key(args, settings)
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

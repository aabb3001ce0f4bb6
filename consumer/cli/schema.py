"""`opstream schema`: the JSON Schema files of every message and the AsyncAPI document."""

from __future__ import annotations

import argparse
from pathlib import Path

from consumer.settings import Settings


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add `opstream schema` to the command line."""
    schema = subparsers.add_parser(
        "schema", parents=[common], help="write JSON Schema files and the AsyncAPI document"
    )
    schema.add_argument("--out", type=Path, required=True, help="directory to write into")
    schema.set_defaults(func=cmd_schema)


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

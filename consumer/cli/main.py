"""The `opstream` command line: one subcommand per job an operator or producer does."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from consumer.settings import Settings, load_settings

CommandFunc = Callable[[argparse.Namespace, Settings], int]


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, default=None, help="TOML settings file (env and flags override it)"
    )
    common.add_argument(
        "--bootstrap-servers",
        default=None,
        help="Kafka bootstrap servers, host:port[,...] (env OPSTREAM_KAFKA__BOOTSTRAP_SERVERS)",
    )
    return common


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Build settings once: TOML < env < the flags given on this command line."""
    overrides: dict[str, Any] = {}
    if getattr(args, "bootstrap_servers", None):
        overrides["kafka"] = {"bootstrap_servers": args.bootstrap_servers}
    for extra in getattr(args, "settings_overrides", ()):
        extra(args, overrides)
    return load_settings(getattr(args, "config", None), **overrides)


def build_parser() -> argparse.ArgumentParser:
    """The full command tree; each area registers its own subcommands (argparse only: a
    command's heavy imports happen when it runs, so `opstream --help` stays quick)."""
    from consumer.cli import batch, dev, keys, limits, request, run, schema, topics, usage

    parser = argparse.ArgumentParser(
        prog="opstream",
        description="LLM operations (summarize, translate, classify, chat) on Kafka.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()
    for area in (run, dev, topics, request, schema, batch, limits, usage, keys):
        area.register(subparsers, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `opstream` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: CommandFunc = args.func
    try:
        settings = settings_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"opstream: invalid settings: {exc}", file=sys.stderr)
        return 2
    try:
        return func(args, settings)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`opstream request ... --stream | head`): no traceback, and
        # nothing more written to the closed pipe at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())

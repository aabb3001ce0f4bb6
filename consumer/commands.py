"""The list of places that add subcommands to the `opstream` command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable

Registrar = Callable[
    ["argparse._SubParsersAction[argparse.ArgumentParser]", argparse.ArgumentParser], None
]


def _core(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    from consumer.core_cli import register

    register(subparsers, common)


def _quota(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    from consumer.quota.cli import register

    register(subparsers, common)


def _usage(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    from consumer.usage.cli import register

    register(subparsers, common)


def _keys(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    from consumer.auth.cli import register

    register(subparsers, common)


REGISTRARS: list[Registrar] = [_core, _quota, _usage, _keys]

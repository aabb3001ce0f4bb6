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
    from consumer.cli.core import register

    register(subparsers, common)


def _quota(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    from consumer.cli.limits import register

    register(subparsers, common)


def _usage(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    from consumer.cli.usage import register

    register(subparsers, common)


def _keys(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    from consumer.cli.keys import register

    register(subparsers, common)


REGISTRARS: list[Registrar] = [_core, _quota, _usage, _keys]

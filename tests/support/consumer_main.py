"""`python -m tests.support.consumer_main [--fake-engine] [--delay S]`: a consumer process for
tests, configured by OPSTREAM_* variables exactly like `opstream run`, optionally with the
zero-cost fake engine instead of a real model."""

from __future__ import annotations

import argparse
import asyncio

from consumer.cli.core import serve
from consumer.observability.logging import configure_logging
from consumer.settings import load_settings
from tests.support.fake_engine import FakeEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fake-engine", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0, help="fake engine seconds per call")
    args = parser.parse_args()
    settings = load_settings()
    configure_logging(settings.logging)
    engine = FakeEngine(delay_s=args.delay) if args.fake_engine else None
    asyncio.run(serve(settings, engine=engine))


if __name__ == "__main__":
    main()

"""`python -m tests.support.consumer_main [--fake-engine] [--delay S] [--stepped SLOTS,STEP_S,
TOKENS]`: a consumer process for tests, configured by OPSTREAM_* variables exactly like
`opstream run`, optionally with the zero-cost fake engine, or the real scheduler over a
model-free stepped backend, instead of a real model."""

from __future__ import annotations

import argparse
import asyncio

from consumer.cli.server import serve
from consumer.observability.logging import configure_logging
from consumer.settings import load_settings
from tests.support.fake_engine import FakeEngine
from tests.support.stepped_backend import start_stepped_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fake-engine", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0, help="fake engine seconds per call")
    parser.add_argument(
        "--stepped", default=None, help="SLOTS,STEP_S,TOKENS: the scheduler over a stepped backend"
    )
    args = parser.parse_args()
    settings = load_settings()
    configure_logging(settings.logging)
    engine: object = FakeEngine(delay_s=args.delay) if args.fake_engine else None
    if args.stepped:
        slots, step_s, tokens = args.stepped.split(",")
        engine = start_stepped_engine(
            settings, slots=int(slots), step_s=float(step_s), tokens=int(tokens)
        )
    asyncio.run(serve(settings, engine=engine))


if __name__ == "__main__":
    main()

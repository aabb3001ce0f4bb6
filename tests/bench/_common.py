"""What the benchmarks share: the repository on sys.path, the command line, the model, a
consumer process on a broker to measure, and one way to print a rate.

A benchmark runs as a script (`.venv/bin/python tests/bench/bench_x.py`), so its own folder
is first on sys.path: it imports this module as `_common`, before anything from `tests.`,
and importing it puts the repository on sys.path.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from consumer.engine.model_files import resolve_gguf  # noqa: E402
from opstream_client import OperationsClient  # noqa: E402
from tests.support.harness import (  # noqa: E402
    FETCH_MAX_WAIT_MS,
    Broker,
    ConsumerProcess,
    TopicSet,
    base_settings,
    client_for,
    ensure_test_topics,
    merge,
)

__all__ = [
    "FETCH_MAX_WAIT_MS",
    "PROMPTS",
    "REPO",
    "Broker",
    "add_model_arguments",
    "bench_client",
    "bench_parser",
    "chat",
    "in_flight",
    "model_path",
    "rate_line",
    "running_consumer",
]

# The chat prompts of the CPU benchmarks (greedy, so a run is repeatable).
PROMPTS = [
    "Explain what a Kafka consumer group is in two sentences.",
    "Write a haiku about the sea.",
    "List three uses of a hash function.",
    "What is the capital of France, and why is it famous?",
    "Give me a short recipe for pancakes.",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
]


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring's first line, the rest under --help."""
    first, _, rest = (doc or "").strip().partition("\n")
    return argparse.ArgumentParser(
        description=first or None,
        epilog=rest.strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_model_arguments(
    parser: argparse.ArgumentParser, *, prompts: int, fetch_wait_ms: int = FETCH_MAX_WAIT_MS
) -> None:
    """The options of the benchmarks that run the packaged model through Kafka."""
    parser.add_argument("--prompts", type=int, default=prompts)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8, help="the engine's sequence slots")
    # Tansu answers a fetch only when its wait is over, so at the tests' 5 ms the consumer and
    # the broker busy-poll and take CPU from the model (~25% at 8 in flight, measured); a
    # real Kafka broker answers as soon as data arrives, whatever the wait.
    parser.add_argument(
        "--fetch-wait-ms",
        type=int,
        default=fetch_wait_ms,
        help="the consumer's and the client's fetch_max_wait_ms",
    )


def model_path() -> Path:
    """The GGUF the CPU benchmarks run: the packaged SmolLM2-135M unless settings say other."""
    return resolve_gguf(None, None, None)


def chat(tenant: str, prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    """A greedy chat request body."""
    return {
        "operation": "chat",
        "tenant_id": tenant,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        **extra,
    }


@asynccontextmanager
async def running_consumer(
    broker: Broker,
    extra: Mapping[str, Any],
    *,
    name: str,
    fake_engine: bool = False,
    ready_timeout_s: float = 180.0,
) -> AsyncIterator[tuple[ConsumerProcess, TopicSet]]:
    """A consumer process on fresh topics of `broker`, ready, stopped afterwards: the tests'
    settings, logging at WARNING, then `extra`. Its log is in a temporary folder named
    after the benchmark."""
    topics = TopicSet.unique()
    await ensure_test_topics(broker, topics)
    tmp = Path(tempfile.mkdtemp(prefix=f"opstream-bench-{name}-"))
    settings = merge(
        merge(base_settings(broker, topics, tmp), {"logging": {"level": "WARNING"}}), extra
    )
    consumer = ConsumerProcess(settings, fake_engine=fake_engine, log_path=tmp / "consumer.log")
    consumer.start()
    try:
        await asyncio.to_thread(consumer.wait_ready, ready_timeout_s)
        yield consumer, topics
    finally:
        consumer.stop()


def bench_client(
    broker: Broker, topics: TopicSet, fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS
) -> OperationsClient:
    """A client for a benchmark's consumer (not started), patient enough for a long run."""
    return client_for(broker, topics, timeout_s=900, fetch_max_wait_ms=fetch_max_wait_ms)


async def in_flight(
    client: OperationsClient,
    bodies: list[dict[str, Any]],
    concurrency: int,
    metas: list[Any] | None = None,
) -> tuple[float, int, list[float]]:
    """Seconds, generated tokens and per-request latencies with `concurrency` in flight."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async def one(body: dict[str, Any]) -> None:
        nonlocal tokens
        async with gate:
            sent = time.perf_counter()
            reply = await client.request(body)
            latencies.append(time.perf_counter() - sent)
            if reply.status != "ok":
                raise RuntimeError(f"error reply: {reply.error}")
            tokens += reply.meta.output_tokens
            if metas is not None:
                metas.append(reply.meta)

    started = time.perf_counter()
    await asyncio.gather(*(one(b) for b in bodies))
    return time.perf_counter() - started, tokens, latencies


def rate_line(label: str, seconds: float, tokens: int, extra: str = "") -> float:
    """Print one measured rate in the benchmarks' shared layout; returns tokens/s."""
    rate = tokens / seconds
    print(f"  {label:<44}{tokens:5d} tokens in {seconds:6.2f} s  {rate:7.1f} tok/s{extra}")
    return rate

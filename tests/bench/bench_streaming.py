"""Benchmark of streamed replies and cancel over Kafka (packaged SmolLM2-135M, greedy).

Prints, in one run:
1. Time to the first chunk over Kafka (request published -> first StreamChunk read by the
   client, `streaming.chunk_tokens` 1) against the engine's own time to first token (in this
   process, same model and settings, generate() called -> first token), medians of N.
2. Cancel over Kafka on a one-slot consumer: cancel published -> the running request's
   `cancelled` reply read, and -> the queued request's first chunk (its slot was freed).

Run: .venv/bin/python tests/bench/bench_streaming.py [--requests 8]
Not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from _common import (  # first: puts the repository on sys.path
    Broker,
    bench_client,
    bench_parser,
    chat,
    running_consumer,
)

from consumer.engine.base import ChatMessage, GenerationRequest, WorkTag
from consumer.engine.factory import load_engine
from consumer.settings import Settings
from tests.support.harness import merge

PROMPTS = [
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "List three uses of a hash function.",
    "Give me a short recipe for pancakes.",
]
ENGINE = {"backend": "llamacpp", "llamacpp": {"n_ctx": 1024}}


async def engine_first_tokens(count: int) -> list[float]:
    """Seconds from generate() to the first token, one request at a time, in process."""
    engine = await asyncio.to_thread(load_engine, Settings(engine=ENGINE))  # type: ignore[arg-type]
    try:
        firsts: list[float] = []
        for i in range(count + 1):
            first: list[float] = []
            started = time.perf_counter()
            await engine.generate(
                GenerationRequest(
                    messages=(ChatMessage("user", PROMPTS[i % len(PROMPTS)]),),
                    max_tokens=16,
                    work=WorkTag(on_text=lambda _t, seen=first: seen.append(time.perf_counter())),
                )
            )
            if i:  # the first one warms up
                firsts.append(first[0] - started)
        return firsts
    finally:
        await engine.close()


def consumer_on(broker: Broker, extra: dict[str, Any]) -> Any:
    """A ready consumer running the benchmark's engine, with `extra` settings on top."""
    return running_consumer(broker, merge({"engine": ENGINE}, extra), name="stream")


async def kafka_first_chunks(broker: Broker, count: int) -> list[float]:
    async with (
        consumer_on(broker, {"streaming": {"chunk_tokens": 1}}) as (_, topics),
        bench_client(broker, topics) as client,
    ):
        firsts: list[float] = []
        for i in range(count + 1):
            started = time.perf_counter()
            stream = client.stream(chat("bench", PROMPTS[i % len(PROMPTS)], 16))
            first = None
            async for _chunk in stream:
                first = first or time.perf_counter()
            if i and first is not None:
                firsts.append(first - started)
        return firsts


async def kafka_cancel(broker: Broker) -> tuple[float, float]:
    extra = {"engine": {"llamacpp": {"slots": 1}}, "streaming": {"chunk_tokens": 1}}
    async with (
        consumer_on(broker, extra) as (_, topics),
        bench_client(broker, topics) as client,
    ):
        long = client.stream(chat("bench", "Count from 1 to 500.", 400, request_id="long"))
        queued = client.stream(chat("bench", "Say hi.", 8))
        seen = 0
        queued_first: list[float] = []

        async def read_queued() -> None:
            async for _chunk in queued:
                queued_first.append(time.perf_counter())

        reading = None
        async for _chunk in long:
            seen += 1
            if seen == 5:
                reading = asyncio.create_task(read_queued())
                await asyncio.sleep(0.5)  # the queued request reaches the scheduler
                cancelled_at = time.perf_counter()
                await client.cancel("long", tenant_id="bench")
        ended = time.perf_counter()
        assert reading is not None
        await reading
        return ended - cancelled_at, queued_first[0] - cancelled_at


async def bench(args: argparse.Namespace) -> None:
    engine_ttft = await engine_first_tokens(args.requests)
    with Broker.start() as broker:
        kafka_ttfc = await kafka_first_chunks(broker, args.requests)
        to_reply, to_queued = await kafka_cancel(broker)
    engine_ms = statistics.median(engine_ttft) * 1000
    kafka_ms = statistics.median(kafka_ttfc) * 1000
    print(f"{args.requests} chat requests one at a time, 16 tokens, greedy")
    print(f"  engine's own time to first token (median)      {engine_ms:7.0f} ms")
    print(f"  time to first chunk over Kafka (median)         {kafka_ms:7.0f} ms "
          f"(+{kafka_ms - engine_ms:.0f} ms: publish, fetch, consumer, reply)")  # fmt: skip
    print("  cancel over Kafka, one slot, one request queued behind the running one:")
    print(f"    cancel published -> cancelled reply read       {to_reply * 1000:7.0f} ms")
    print(f"    cancel published -> queued request's 1st chunk {to_queued * 1000:7.0f} ms")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--requests", type=int, default=8)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()

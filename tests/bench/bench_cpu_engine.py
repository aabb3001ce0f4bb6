"""Benchmark of the CPU engine under the scheduler: throughput, fairness, cancel delay.

Prints, in one run (packaged SmolLM2-135M GGUF, greedy):
1. Aggregate generated tokens/s through Kafka and a consumer process at 1, 4 and 8 requests in
   flight, against the same prompts run one after another directly on llama.cpp
   (`llama_cpp.Llama.create_completion`, not opstream's code) — goal >= 1.5x at 8.
2. Fairness: tenant A queues 64 requests, tenant B sends 4 a moment later; B's median latency
   against B's median latency alone — goal <= 2x.
3. Cancel to slot reuse, in process: all slots busy, one request queued, one running request
   cancelled; the time until the queued one's first token, in decode steps — goal: one step.
Section 3 needs the scheduler's cancel; on code without it, it is skipped (so the same file
measures the code before the scheduler too).

Run: .venv/bin/python tests/bench/bench_cpu_engine.py [--prompts 8] [--max-tokens 64]
Not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from _common import (  # first: puts the repository on sys.path
    PROMPTS,
    Broker,
    add_model_arguments,
    bench_client,
    bench_parser,
    chat,
    in_flight,
    model_path,
    rate_line,
    running_consumer,
)

from consumer.engine.llamacpp.native import usable_cores
from opstream_client import OperationsClient
from tests.support.plain_llama import repacking_off
from tests.support.waiting import wait_until


def direct_sequential(
    prompts: list[str], max_tokens: int, threads: int | None = None
) -> tuple[float, int]:
    """Seconds and generated tokens for the prompts one after another on plain llama.cpp
    (`threads` None: llama-cpp-python's defaults, half the cores for one token)."""
    from llama_cpp import Llama

    with repacking_off():
        llama = Llama(
            model_path=str(model_path()),
            n_ctx=2048,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    try:
        messages = [[{"role": "user", "content": p}] for p in prompts]
        llama.create_chat_completion(messages=messages[0], max_tokens=8, temperature=0.0)
        started = time.perf_counter()
        tokens = 0
        for conversation in messages:
            done: Any = llama.create_chat_completion(
                messages=conversation, max_tokens=max_tokens, temperature=0.0
            )
            tokens += int(done["usage"]["completion_tokens"])
        return time.perf_counter() - started, tokens
    finally:
        llama.close()


async def through_consumer(args: argparse.Namespace) -> None:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    cores = usable_cores()
    print(f"{len(prompts)} chat prompts, max_tokens {args.max_tokens}, greedy, {cores} cores")
    default_s, default_tokens = direct_sequential(prompts, args.max_tokens)
    rate_line("direct llama.cpp, its default threads", default_s, default_tokens)
    # The baseline: the same threads as the consumer's engine uses (every core).
    direct_s, direct_tokens = direct_sequential(prompts, args.max_tokens, cores)
    direct_rate = rate_line(
        f"direct llama.cpp, {cores} threads, one after another",
        direct_s,
        direct_tokens,
        "  (the baseline)",
    )
    extra = {
        "engine": {"backend": "llamacpp"},
        "kafka": {"fetch_max_wait_ms": args.fetch_wait_ms},
    }
    with Broker.start() as broker:
        async with running_consumer(broker, extra, name="cpu") as (consumer, topics):
            _, health = consumer.get("/health")
            scheduler = health.get("scheduler") if isinstance(health, dict) else None
            print(f"  consumer scheduler: {scheduler or 'none (one request at a time)'}")
            async with bench_client(broker, topics, args.fetch_wait_ms) as client:
                await client.request(chat("warm-up", prompts[0], 8))
                for concurrency in (1, 4, 8):
                    bodies = [chat("bench", p, args.max_tokens) for p in prompts]
                    seconds, tokens, _ = await in_flight(client, bodies, concurrency)
                    rate = tokens / seconds
                    rate_line(
                        f"consumer, {concurrency} in flight",
                        seconds,
                        tokens,
                        f"  = {rate / direct_rate:.2f}x direct",
                    )
                if not args.skip_fairness:
                    await fairness(client, args)


async def fairness(client: OperationsClient, args: argparse.Namespace) -> None:
    small = [chat("tenant-b", PROMPTS[i % len(PROMPTS)], 16) for i in range(4)]
    alone_meta: list[Any] = []
    crowded_meta: list[Any] = []
    _, _, alone = await in_flight(client, small, 4, alone_meta)
    flood = [chat("tenant-a", PROMPTS[i % len(PROMPTS)], 32) for i in range(args.flood)]
    flooding = asyncio.create_task(in_flight(client, flood, len(flood)))
    await asyncio.sleep(1.0)
    _, _, crowded = await in_flight(client, [dict(b) for b in small], 4, crowded_meta)
    flood_s, _, _ = await flooding
    ratio = statistics.median(crowded) / statistics.median(alone)
    print(f"  fairness: tenant A queues {args.flood} requests (32 tokens), tenant B sends 4 "
          f"(16 tokens) 1 s later")  # fmt: skip
    print(f"    B median latency alone {statistics.median(alone):6.2f} s, behind A's flood "
          f"{statistics.median(crowded):6.2f} s = {ratio:.2f}x (goal <= 2x); A's flood took "
          f"{flood_s:.1f} s")  # fmt: skip
    for label, metas in (("alone", alone_meta), ("behind the flood", crowded_meta)):
        queue = statistics.median(m.queue_ms for m in metas)
        run = statistics.median(m.execution_time_ms for m in metas)
        print(f"    B {label}: median {queue:.0f} ms in Kafka before the consumer took it, "
              f"{run:.0f} ms in the engine (queued for a slot + generating)")  # fmt: skip


async def cancel_delay(args: argparse.Namespace) -> None:
    try:
        from consumer.engine.base import GenerationRequest, WorkTag
        from consumer.engine.factory import load_engine
    except ImportError:
        print("  cancel: this code has no scheduler cancel; skipped")
        return
    from consumer.engine.base import ChatMessage
    from consumer.settings import Settings

    slots = args.slots
    settings = Settings(engine={"backend": "llamacpp", "llamacpp": {"slots": slots}})  # type: ignore[arg-type]
    engine = await asyncio.to_thread(load_engine, settings)
    if not hasattr(engine, "cancel"):
        print("  cancel: this code has no scheduler cancel; skipped")
        await engine.close()
        return
    try:
        token_times: dict[str, list[float]] = {}

        def request(key: str, max_tokens: int) -> GenerationRequest:
            token_times[key] = []
            return GenerationRequest(
                messages=(ChatMessage("user", "Count from 1 to 500, one per line."),),
                max_tokens=max_tokens,
                work=WorkTag(
                    tenant="t",
                    key=key,
                    on_text=lambda _text: token_times[key].append(time.perf_counter()),
                ),
            )

        running = [
            asyncio.create_task(engine.generate(request(f"run-{i}", 300))) for i in range(slots)
        ]
        await wait_until(lambda: all(len(token_times[f"run-{i}"]) >= 10 for i in range(slots)), 120)
        submitted = time.perf_counter()
        queued = asyncio.create_task(engine.generate(request("queued", 4)))
        await asyncio.sleep(0.3)
        steady = token_times["run-1"][-6:]
        step_s = (steady[-1] - steady[0]) / (len(steady) - 1)
        cancelled_at = time.perf_counter()
        await engine.cancel("run-0")
        generation = await queued
        # When the scheduler gave the queued request the freed slot (it waited until then).
        started = submitted + generation.timings["queued_ms"] / 1000
        reuse = started - cancelled_at
        first = token_times["queued"][0] - cancelled_at
        print(f"  cancel -> the freed slot taken by the queued request: {reuse * 1000:.0f} ms = "
              f"{reuse / step_s:.1f} decode steps of {step_s * 1000:.0f} ms ({slots} sequences; "
              f"goal: one step); -> its first token {first * 1000:.0f} ms = "
              f"{first / step_s:.1f} steps (its prefill included)")  # fmt: skip
        for task in running[1:]:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    finally:
        await engine.close()


async def bench(args: argparse.Namespace) -> None:
    await through_consumer(args)
    if not args.skip_cancel:
        await cancel_delay(args)


def main() -> None:
    parser = bench_parser(__doc__)
    add_model_arguments(parser, prompts=8)
    parser.add_argument("--flood", type=int, default=64)
    parser.add_argument("--skip-fairness", action="store_true")
    parser.add_argument("--skip-cancel", action="store_true")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()

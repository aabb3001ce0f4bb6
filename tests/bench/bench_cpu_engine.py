"""Benchmark of generated tokens/s on CPU: through the consumer vs llama.cpp called directly.

The same chat prompts (temperature 0, max_tokens 64) go straight to `LlamaCppEngine` (the
consumer's own llama.cpp wrapper, in this process, before and after) and once through Kafka
to a consumer process running the packaged SmolLM2-135M GGUF (dev profile: auth off, quotas
and usage on).
Tokens/s is generated tokens over wall time from the first request to the last reply; the
consumer's requests are all in flight at once, as a busy service's would be.

Run: .venv/bin/python tests/bench/bench_cpu_engine.py [--prompts 12] [--max-tokens 64]
Not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `tests.support` importable
    sys.path.insert(0, str(REPO))

from consumer.client import OperationsClient  # noqa: E402
from consumer.engine.base import ChatMessage, GenerationRequest  # noqa: E402
from consumer.engine.llamacpp import LlamaCppEngine  # noqa: E402
from consumer.engine.models import resolve_gguf  # noqa: E402
from consumer.settings import LlamaCppSettings  # noqa: E402
from tests.support.harness import (  # noqa: E402
    FETCH_MAX_WAIT_MS,
    Broker,
    ConsumerProcess,
    TopicSet,
    base_settings,
    ensure_test_topics,
    merge,
)

PROMPTS = [
    "Explain what a Kafka consumer group is in two sentences.",
    "Write a haiku about the sea.",
    "List three uses of a hash function.",
    "What is the capital of France, and why is it famous?",
    "Give me a short recipe for pancakes.",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "What are the benefits of regular exercise?",
    "Translate 'good morning' into Spanish and French.",
    "Suggest a name for a coffee shop and explain it.",
    "How does a bicycle stay upright?",
]
TENANT = "bench-cpu"


def chat_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def load_direct_engine() -> LlamaCppEngine:
    """The consumer's own llama.cpp wrapper with the consumer's defaults, in this process."""
    cfg = LlamaCppSettings()  # same context, threads, batch and seed as the consumer's
    return LlamaCppEngine(
        resolve_gguf(None, None, None),
        n_ctx=cfg.n_ctx,
        n_threads=cfg.n_threads,
        n_batch=cfg.n_batch,
        seed=cfg.seed,
    )


async def direct(
    engine: LlamaCppEngine, prompts: list[str], max_tokens: int
) -> tuple[float, list[int]]:
    """Seconds and output tokens per prompt, calling the engine in turn."""
    requests = [
        GenerationRequest(
            messages=(ChatMessage("user", p),), max_tokens=max_tokens, temperature=0.0
        )
        for p in prompts
    ]
    await engine.generate(requests[0])  # warm-up, as the consumer gets one below
    started = time.perf_counter()
    tokens = [(await engine.generate(r)).output_tokens for r in requests]
    return time.perf_counter() - started, tokens


async def through_consumer(
    broker: Broker, prompts: list[str], max_tokens: int
) -> tuple[float, list[int], list[str]]:
    """Seconds, output tokens per prompt and reply statuses, via Kafka and a consumer process."""
    topics = TopicSet.unique()
    await ensure_test_topics(broker, topics)
    tmp = Path(tempfile.mkdtemp(prefix="opstream-bench-cpu-"))
    settings = merge(
        base_settings(broker, topics, tmp),
        {"engine": {"backend": "llamacpp"}, "logging": {"level": "WARNING"}},
    )
    consumer = ConsumerProcess(settings, fake_engine=False, log_path=tmp / "consumer.log").start()
    try:
        consumer.wait_ready(timeout_s=180)
        async with OperationsClient(
            broker.bootstrap,
            request_topic=topics.requests,
            reply_topic=topics.replies,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            timeout_s=600,
        ) as client:
            await client.chat(
                tenant_id=TENANT, messages=chat_messages(prompts[0]), max_tokens=max_tokens,
                temperature=0.0,
            )  # fmt: skip
            started = time.perf_counter()
            replies = await asyncio.gather(
                *(
                    client.chat(
                        tenant_id=TENANT,
                        messages=chat_messages(p),
                        max_tokens=max_tokens,
                        temperature=0.0,
                    )
                    for p in prompts
                )
            )
            elapsed = time.perf_counter() - started
        tokens = [r.meta.output_tokens if r.meta else 0 for r in replies]
        statuses = [r.status if r.status == "ok" else f"error:{r.error}" for r in replies]
        return elapsed, tokens, statuses
    finally:
        consumer.stop()


async def bench(args: argparse.Namespace) -> None:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    # Direct runs before and after the consumer's, so drift on a shared machine shows.
    engine = load_direct_engine()
    try:
        before_s, direct_tokens = await direct(engine, prompts, args.max_tokens)
        broker = Broker.start()
        try:
            consumer_s, consumer_tokens, statuses = await through_consumer(
                broker, prompts, args.max_tokens
            )
        finally:
            broker.stop()
        after_s, _ = await direct(engine, prompts, args.max_tokens)
    finally:
        await engine.close()
    direct_s = (before_s + after_s) / 2
    direct_rate = sum(direct_tokens) / direct_s
    consumer_rate = sum(consumer_tokens) / consumer_s
    print(f"{len(prompts)} chat prompts, max_tokens {args.max_tokens}, temperature 0")
    for label, seconds in (("before", before_s), ("after", after_s)):
        print(f"  direct, {label:<6}          {sum(direct_tokens):5d} tokens in {seconds:6.2f} s"
              f"   {sum(direct_tokens) / seconds:7.1f} tokens/s")  # fmt: skip
    print(f"  through the consumer    {sum(consumer_tokens):5d} tokens in {consumer_s:6.2f} s"
          f"   {consumer_rate:7.1f} tokens/s")  # fmt: skip
    print(f"  consumer / direct (mean of both direct runs): {consumer_rate / direct_rate:.2f}x"
          " (target >= 0.95x)")  # fmt: skip
    same = direct_tokens == consumer_tokens
    print(f"  same output token counts per prompt: {same}"
          + ("" if same else f" (direct {direct_tokens}, consumer {consumer_tokens})"))  # fmt: skip
    failed = [s for s in statuses if s != "ok"]
    if failed:
        print(f"  {len(failed)} consumer replies were errors: {failed[:3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=64)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()

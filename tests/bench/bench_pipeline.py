"""Benchmark of the consumer's own overhead: the full pipeline (zero-cost engine) vs a bare echo.

Both services run as their own processes on one broker and are driven by the same load
generator (fixed concurrency, round trip measured from send to reply). The consumer runs as
`opstream run` does (dev profile: auth off; quotas, usage log and the intake's commit path on,
with production intervals), with `FakeEngine` instead of a model. The echo service is what a
hand-written aiokafka service would do at least: consume, produce a reply with the
correlation id, wait for the broker's acks, commit.

Run: .venv/bin/python tests/bench/bench_pipeline.py [--requests 2000] [--concurrency 64]
Not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

from _common import (  # first: puts the repository on sys.path
    FETCH_MAX_WAIT_MS,
    REPO,
    Broker,
    bench_parser,
    running_consumer,
)
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumer.bus.topic_reader import topic_partitions
from tests.support.harness import TopicSet, ensure_test_topics

TENANTS = [f"bench-tenant-{i:02d}" for i in range(64)]  # 2000 requests stay far below quotas
ECHO_REPLY = json.dumps(
    {
        "status": "ok",
        "result": {"message": {"role": "assistant", "content": "word."}, "finish_reason": "stop"},
        "meta": {"operation": "chat", "model_used": "echo", "input_chars": 5},
    }
).encode()


# ── the bare echo service (a child process) ──


async def echo_service(bootstrap: str, requests: str, replies: str, group: str) -> None:
    """Consume `requests`, reply on `replies` with the correlation id, commit after the acks."""
    consumer = AIOKafkaConsumer(
        requests,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1)
    await producer.start()
    await consumer.start()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            acks = []
            for records in batches.values():
                for record in records:
                    correlation = next((v for k, v in record.headers if k == "correlation_id"), b"")
                    acks.append(
                        await producer.send(
                            replies,
                            ECHO_REPLY,
                            key=record.key,
                            headers=[("correlation_id", correlation)],
                        )
                    )
            if acks:
                await asyncio.gather(*acks)
                await consumer.commit(
                    {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
                )
    finally:
        await consumer.stop()
        await producer.stop()


def start_echo_service(bootstrap: str, topics: TopicSet) -> subprocess.Popen[bytes]:
    """This script in `--echo-service` mode, as a child process."""
    args = [topics.requests, topics.replies, topics.group]
    return subprocess.Popen(
        [sys.executable, __file__, "--echo-service", bootstrap, *args], cwd=REPO
    )


# ── the load generator ──


@dataclass
class RunResult:
    label: str
    requests: int
    elapsed_s: float
    latencies_ms: list[float]
    errors: int

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed_s

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LoadGenerator:
    """Publishes chat requests and matches replies by correlation id (one per service)."""

    def __init__(self, bootstrap: str, topics: TopicSet) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.waiting: dict[str, asyncio.Future[bytes]] = {}
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        partitions = await topic_partitions(self.consumer, self.topics.replies)
        assignment = [TopicPartition(self.topics.replies, p) for p in sorted(partitions)]
        self.consumer.assign(assignment)
        await self.consumer.seek_to_end(*assignment)
        for tp in assignment:
            await self.consumer.position(tp)
        self.reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        await self.consumer.stop()
        await self.producer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    correlation = next(
                        (v.decode() for k, v in record.headers if k == "correlation_id"), ""
                    )
                    waiter = self.waiting.pop(correlation, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(record.value)

    async def one(self, index: int, timeout_s: float) -> tuple[float, bool]:
        tenant = TENANTS[index % len(TENANTS)]
        correlation = uuid.uuid4().hex
        body = {
            "operation": "chat",
            "tenant_id": tenant,
            "messages": [{"role": "user", "content": f"Say hello number {index}."}],
            "max_tokens": 8,
        }
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[correlation] = waiter
        started = time.perf_counter()
        await self.producer.send_and_wait(
            self.topics.requests,
            json.dumps(body).encode(),
            key=tenant.encode(),
            headers=[
                ("correlation_id", correlation.encode()),
                ("reply_to", self.topics.replies.encode()),
                ("content-type", b"application/json"),
            ],
        )
        try:
            value = await asyncio.wait_for(waiter, timeout_s)
        finally:
            self.waiting.pop(correlation, None)
        ok = json.loads(value).get("status") == "ok"
        return (time.perf_counter() - started) * 1000, ok

    async def run(
        self, label: str, count: int, concurrency: int, timeout_s: float = 30.0
    ) -> RunResult:
        latencies: list[float] = []
        errors = 0
        next_index = 0

        async def worker() -> None:
            nonlocal next_index, errors
            while next_index < count:
                index = next_index
                next_index += 1
                latency, ok = await self.one(index, timeout_s)
                latencies.append(latency)
                errors += not ok

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return RunResult(label, count, time.perf_counter() - started, latencies, errors)


async def wait_until_answering(load: LoadGenerator, name: str, timeout_s: float = 120.0) -> None:
    """One request answered: the service joined its group and owns the partitions."""
    started = time.perf_counter()
    await load.one(0, timeout_s)
    print(f"{name}: answering after {time.perf_counter() - started:.1f} s", flush=True)


def report(result: RunResult) -> None:
    print(
        f"  {result.label:<9} {result.rate:8.0f} req/s   p50 {result.percentile(0.5):7.1f} ms"
        f"   p99 {result.percentile(0.99):7.1f} ms   errors {result.errors}",
        flush=True,
    )


def merged(label: str, results: list[RunResult]) -> RunResult:
    return RunResult(
        label,
        sum(r.requests for r in results),
        sum(r.elapsed_s for r in results),
        [x for r in results for x in r.latencies_ms],
        sum(r.errors for r in results),
    )


async def bench(args: argparse.Namespace) -> None:
    echo_process: subprocess.Popen[bytes] | None = None
    loads: list[LoadGenerator] = []
    with Broker.start() as broker:
        try:
            echo_topics = TopicSet.unique()
            await ensure_test_topics(broker, echo_topics)
            # One group join at a time: concurrent joins can wedge Tansu's group coordinator
            # (README, "Tests and benchmarks"); Apache Kafka does not need this.
            echo_process = start_echo_service(broker.bootstrap, echo_topics)
            echo = LoadGenerator(broker.bootstrap, echo_topics)
            loads.append(echo)
            await echo.start()
            await wait_until_answering(echo, "echo service")
            # Production intervals: commit every 50 ms, usage rows flushed every 5 s.
            extra = {
                "intake": {"commit_interval_ms": 50},
                "usage": {"flush_age_s": 5.0, "enabled": args.usage},
                "quota": {"enabled": args.quota},
            }
            async with running_consumer(broker, extra, name="pipeline", fake_engine=True) as (
                _,
                consumer_topics,
            ):
                full = LoadGenerator(broker.bootstrap, consumer_topics)
                loads.append(full)
                await full.start()
                await wait_until_answering(full, "consumer")
                await measure(args, broker, echo, full)
        finally:
            for load in loads:
                await load.stop()
            if echo_process is not None:
                echo_process.terminate()
                echo_process.wait(10)


async def measure(
    args: argparse.Namespace, broker: Broker, echo: LoadGenerator, full: LoadGenerator
) -> None:
    """Warm both up, then alternate runs of the echo service and the consumer; print each."""
    for load, label in ((echo, "echo"), (full, "consumer")):
        await load.run(label, args.warmup, args.concurrency)
    print(
        f"\n{args.requests} requests per run, {args.concurrency} concurrent, "
        f"{args.rounds} rounds (alternating); quota {'on' if args.quota else 'OFF'}, "
        f"usage {'on' if args.usage else 'OFF'}; broker {broker.bootstrap}",
        flush=True,
    )
    rounds: dict[str, list[RunResult]] = {"echo": [], "consumer": []}
    for round_number in range(1, args.rounds + 1):
        print(f"round {round_number}:")
        for load, label in ((echo, "echo"), (full, "consumer")):
            result = await load.run(label, args.requests, args.concurrency)
            rounds[label].append(result)
            report(result)
    echo_all, full_all = merged("echo", rounds["echo"]), merged("consumer", rounds["consumer"])
    print("all rounds:")
    report(echo_all)
    report(full_all)
    print(
        f"\nconsumer / echo throughput: {full_all.rate / echo_all.rate:.2f}x (target >= 0.8x)"
        f"   p50 latency ratio {full_all.percentile(0.5) / echo_all.percentile(0.5):.2f}x"
    )


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--echo-service":
        try:
            asyncio.run(echo_service(*sys.argv[2:]))
        except KeyboardInterrupt:
            pass
        return
    parser = bench_parser(__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="alternating echo/consumer runs")
    # For locating overhead only; the comparison that counts runs with both on.
    parser.add_argument("--quota", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--usage", action=argparse.BooleanOptionalAction, default=True)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()

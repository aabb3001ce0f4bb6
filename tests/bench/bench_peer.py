"""opstream against the engine a user would otherwise put behind a gateway: llama.cpp's own
`llama-server` (continuous batching, `-np 8`), same model, prompts and threads, one run.

Prints:
1. Aggregate generated tokens/s at 1 and 8 in flight: llama-server over HTTP, opstream
   through Kafka (Tansu) and a consumer process; and the ratio (goal at 8: >= 0.8x).
   Also the CPU the broker and the consumer process took during opstream's 8-in-flight run.
2. Serial tokens/s (one request at a time) quiet and under a CPU hog (a bounded busy loop
   in a process of its own taking one core), for both: the ratio hog/quiet (goal for
   opstream: >= 0.4x), side by side with llama-server's.
3. Fair-share preemption on vs off, in process (the scheduler and the llama.cpp backend, no
   Kafka): 3 heavy tenants and a light one; aggregate tokens/s and the light tenant's median
   latency against its latency alone.

llama-server: $OPSTREAM_LLAMA_SERVER, `llama-server` on PATH, or
~/.cache/opstream/llama-server/llama-server; `--build` builds it there first
(tests/bench/build_llama_server.sh: the llama.cpp sources vendored in the llama-cpp-python
sdist this venv runs, ~15 min on 2 cores). Without one, sections 1-2 print why and run
opstream's side alone.

Run: .venv/bin/python tests/bench/bench_peer.py [--build] [--max-tokens 64] [--prompts 16]
Not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
from _common import (  # first: puts the repository on sys.path
    PROMPTS,
    REPO,
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

from consumer.bus.devbroker import free_port
from consumer.engine.base import ChatMessage, GenerationRequest, WorkTag
from consumer.engine.llamacpp.native import usable_cores

CACHED = Path.home() / ".cache" / "opstream" / "llama-server" / "llama-server"
HOG_LIMIT_S = 300.0  # the busy loop ends by itself even if the benchmark dies


def find_llama_server(build: bool) -> Path | None:
    for candidate in (os.environ.get("OPSTREAM_LLAMA_SERVER"), shutil.which("llama-server")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    if not CACHED.is_file() and build:
        subprocess.run([str(REPO / "tests/bench/build_llama_server.sh")], check=True)
    return CACHED if CACHED.is_file() else None


def _spin(until: float) -> None:
    while time.time() < until:
        pass


@contextmanager
def cpu_hog() -> Iterator[None]:
    """One core kept busy by another process (what a neighbour on a shared box does)."""
    hog = multiprocessing.Process(target=_spin, args=(time.time() + HOG_LIMIT_S,), daemon=True)
    hog.start()
    time.sleep(0.5)
    try:
        yield
    finally:
        hog.terminate()
        hog.join(5)


# -- llama-server --------------------------------------------------------------------------


@contextmanager
def llama_server(binary: Path, threads: int, slots: int, n_ctx: int) -> Iterator[str]:
    port = free_port()
    args = [
        str(binary),
        "-m", str(model_path()),
        "--host", "127.0.0.1", "--port", str(port),
        "-np", str(slots), "-c", str(slots * n_ctx),
        "-t", str(threads), "-tb", str(threads),
        "--no-repack",  # as the engine does (some VMs fault on repacked AMX kernels)
    ]  # fmt: skip
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited: {process.stderr.read()[-2000:]!r}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            raise TimeoutError("llama-server did not become healthy in 120 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def server_completion(url: str, prompt: str, max_tokens: int) -> int:
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
    ).encode()
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return int(json.loads(response.read())["usage"]["completion_tokens"])


def server_in_flight(
    url: str, prompts: list[str], concurrency: int, max_tokens: int
) -> tuple[float, int]:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(lambda p: server_completion(url, p, max_tokens), prompts))
    return time.perf_counter() - started, tokens


# -- opstream through Kafka ---------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    try:
        process = psutil.Process(pid)
        total = sum(process.cpu_times()[:2])
        for child in process.children(recursive=True):
            total += sum(child.cpu_times()[:2])
        return total
    except psutil.Error:
        return 0.0


async def peer(args: argparse.Namespace) -> None:
    cores = usable_cores()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    serial = prompts[: args.serial]
    print(
        f"{len(prompts)} chat prompts (serial runs: {len(serial)}), max_tokens "
        f"{args.max_tokens}, greedy, {cores} cores, {args.slots} slots"
    )
    server: dict[str, float] = {}
    binary = find_llama_server(args.build)
    if binary is None:
        print(
            "  llama-server: not found (set OPSTREAM_LLAMA_SERVER, put it on PATH, or pass "
            "--build to build it from the vendored llama.cpp); opstream's side only"
        )
    else:
        with llama_server(binary, cores, args.slots, args.n_ctx) as url:
            server_completion(url, prompts[0], 8)  # warm-up
            for concurrency in (1, args.slots):
                seconds, tokens = server_in_flight(url, prompts, concurrency, args.max_tokens)
                server[f"{concurrency}"] = rate_line(
                    f"llama-server -np {args.slots}, {concurrency} in flight", seconds, tokens
                )
            seconds, tokens = server_in_flight(url, serial, 1, args.max_tokens)
            server["quiet"] = rate_line("llama-server serial, quiet", seconds, tokens)
            with cpu_hog():
                seconds, tokens = server_in_flight(url, serial, 1, args.max_tokens)
            server["hog"] = rate_line(
                "llama-server serial, one core hogged",
                seconds,
                tokens,
                f"  = {tokens / seconds / server['quiet']:.2f}x quiet",
            )

    extra = {
        "engine": {"backend": "llamacpp", "llamacpp": {"slots": args.slots}},
        # The service's default (the tests flush every 0.2 s, and each flush is a DuckDB COPY
        # that takes a core from the model for a moment).
        "usage": {"flush_age_s": 5.0},
        "kafka": {"fetch_max_wait_ms": args.fetch_wait_ms},
    }
    with Broker.start() as broker:
        async with (
            running_consumer(broker, extra, name="peer") as (consumer, topics),
            bench_client(broker, topics, args.fetch_wait_ms) as client,
        ):
            assert consumer.process is not None
            await client.request(chat("warm-up", prompts[0], 8))
            for concurrency in (1, args.slots):
                broker_cpu = cpu_seconds(broker.local.process.pid) if broker.local else 0.0
                consumer_cpu = cpu_seconds(consumer.process.pid)
                bodies = [chat("bench", p, args.max_tokens) for p in prompts]
                seconds, tokens, _ = await in_flight(client, bodies, concurrency)
                peer_rate = server.get(f"{concurrency}")
                ratio = f"  = {tokens / seconds / peer_rate:.2f}x llama-server" if peer_rate else ""
                rate_line(f"opstream via Kafka, {concurrency} in flight", seconds, tokens, ratio)
                if broker.local:
                    used = cpu_seconds(broker.local.process.pid) - broker_cpu
                    own = cpu_seconds(consumer.process.pid) - consumer_cpu
                    print(
                        f"    CPU: broker {used / seconds / cores:.0%} of the machine, "
                        f"consumer process (model included) {own / seconds / cores:.0%}"
                    )
            bodies = [chat("serial", p, args.max_tokens) for p in serial]
            seconds, tokens, _ = await in_flight(client, bodies, 1)
            quiet = rate_line("opstream serial via Kafka, quiet", seconds, tokens)
            with cpu_hog():
                seconds, tokens, _ = await in_flight(client, [dict(b) for b in bodies], 1)
            ratio = tokens / seconds / quiet
            peer_ratio = f"; llama-server {server['hog'] / server['quiet']:.2f}x" if server else ""
            rate_line(
                "opstream serial via Kafka, one core hogged",
                seconds,
                tokens,
                f"  = {ratio:.2f}x quiet (goal >= 0.4x){peer_ratio}",
            )
            _, health = consumer.get("/health")
            print(f"    engine threads now: {health.get('models')} {_threads(health)}")


def _threads(health: Any) -> str:
    return "" if not isinstance(health, dict) else str(health.get("scheduler"))


# -- fair-share preemption on vs off, in process --------------------------------------------


async def timed(call: Awaitable[Any]) -> tuple[float, int]:
    sent = time.perf_counter()
    generation = await call
    return time.perf_counter() - sent, int(generation.output_tokens)


def ask(engine: Any, tenant: str, i: int, tokens: int) -> Awaitable[Any]:
    return engine.generate(
        GenerationRequest(
            messages=(ChatMessage("user", PROMPTS[i % len(PROMPTS)]),),
            max_tokens=tokens,
            work=WorkTag(tenant=tenant, key=f"{tenant}/{i}/{time.monotonic_ns()}"),
        )
    )


async def load_and_light(
    engine: Any, heavy_tenants: int, per_tenant: int, tokens: int
) -> tuple[float, float]:
    """Heavy tenants queue `per_tenant` requests of `tokens` each; a light tenant sends 4 of
    a quarter that 1 s later: (aggregate tokens/s, the light tenant's median latency over
    its latency alone)."""
    light = max(1, tokens // 4)
    alone = await asyncio.gather(*(timed(ask(engine, "light", i, light)) for i in range(4)))
    started = time.perf_counter()
    heavy = [
        asyncio.create_task(timed(ask(engine, f"heavy-{t}", i, tokens)))
        for t in range(heavy_tenants)
        for i in range(per_tenant)
    ]
    await asyncio.sleep(1.0)
    crowded = await asyncio.gather(*(timed(ask(engine, "light", 100 + i, light)) for i in range(4)))
    done = await asyncio.gather(*heavy)
    wall = time.perf_counter() - started
    tokens = sum(t for _, t in done) + sum(t for _, t in crowded)
    ratio = statistics.median(s for s, _ in crowded) / statistics.median(s for s, _ in alone)
    return tokens / wall, ratio


async def fair_share(args: argparse.Namespace) -> None:
    from consumer.engine.llamacpp import LlamaCppBackend
    from consumer.engine.scheduler.engine import start_scheduled_engine

    path = model_path()
    loads = {
        f"3 heavy tenants x {args.heavy} ({args.max_tokens} tokens)": (
            3,
            args.heavy,
            args.max_tokens,
        ),
        "1 tenant's flood of 64 (32 tokens)": (1, 64, 32),
    }
    print("fair-share preemption on vs off, in process; a light tenant sends 4 requests 1 s later")
    for name, (tenants, per_tenant, tokens) in loads.items():
        results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        pauses = {False: 0, True: 0}
        for _ in range(args.repeat):  # alternated, so drift on a shared machine hits both
            for fair in (False, True):
                engine = await asyncio.to_thread(
                    start_scheduled_engine,
                    lambda: LlamaCppBackend(path, slots=args.slots),
                    max_queued=1000,
                    step_tokens=128,
                    fair_preemption=fair,
                )
                try:
                    results[fair].append(await load_and_light(engine, tenants, per_tenant, tokens))
                    pauses[fair] += engine.info.details["scheduler"]["preemptions"]  # type: ignore[index]
                finally:
                    await engine.close()
        for fair in (False, True):
            rate = statistics.median(r for r, _ in results[fair])
            ratio = statistics.median(q for _, q in results[fair])
            print(
                f"  {name}, fair_preemption={fair!s:<5}: aggregate {rate:6.1f} tok/s, light "
                f"tenant median latency {ratio:.2f}x alone (medians of {args.repeat}); "
                f"{pauses[fair]} pauses in all"
            )
        ratios = [on[0] / off[0] for on, off in zip(results[True], results[False], strict=True)]
        print(
            f"  {name}: on/off aggregate throughput, per pair: "
            + ", ".join(f"{r:.2f}x" for r in ratios)
            + f" (median {statistics.median(ratios):.2f}x)"
        )


async def bench(args: argparse.Namespace) -> None:
    if not args.skip_peer:
        await peer(args)
    if not args.skip_fair:
        await fair_share(args)


def main() -> None:
    parser = bench_parser(__doc__)
    add_model_arguments(parser, prompts=16, fetch_wait_ms=100)
    parser.add_argument("--build", action="store_true", help="build llama-server if missing")
    parser.add_argument("--serial", type=int, default=6)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--heavy", type=int, default=8, help="requests per heavy tenant")
    parser.add_argument("--repeat", type=int, default=3, help="fair-share on/off pairs")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-fair", action="store_true")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()

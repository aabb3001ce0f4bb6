"""Benchmark of structured output (extract) through Kafka on the packaged SmolLM2-135M, greedy.

Prints, in one run:
1. Validity: the schema corpus (tests/support/extract_corpus.py: 11 schemas x 2 texts) as
   `extract` requests (constrained decoding) and as the same prompt sent as a plain `chat`
   (the system prompt asks for JSON following the schema; no response_format). For each: how
   many replies are ok, parse as JSON and validate against their schema (jsonschema). Plain
   chat is parsed strictly (the whole reply is JSON) and leniently (code fences stripped, the
   first {...} span).
2. Cost per token, in this process on the scheduled llama.cpp engine (8 slots), for a wave
   of 8 requests started together and for 1 at a time: decode tokens/s (generated tokens
   over the time in decode-only llama_decode batches plus sampling) with a schema
   (extract's prompt and constraint) and without (the same prompt unconstrained, max_tokens
   set to what the constrained run produced), variants alternating, medians of the rounds;
   and the grammar's own share (mask, apply, advance in the sampler) of the same tokens'
   time. Goal: <= 15%. The share is the cost a schema adds to a token (nothing else in a
   step changes); the runs-apart rates also carry whatever else the machine did meanwhile
   (on a shared 2-core box they swing by tens of percent either way).
3. Grammar compile time for the corpus in this process (the consumer's code, SmolLM2's
   vocabulary): cold (an empty cache), cached, and a sequence's matcher from the cache.

Run: .venv/bin/python tests/bench/bench_structured.py [--texts 2] [--max-tokens 128]
Not a test: it prints numbers and asserts nothing.

Measured 2026-12-06 on the 2-core development VM, quiet: extract 21/22 ok, 21/21 valid, 1
incomplete_output; plain chat 0/22 parse as JSON (SmolLM2-135M answers in prose), so 100%
fail validation. Per token with a schema: +5.9% at 1 in flight, +0.1% at 8 (the grammar's
own share: 311 and 224 us a token, +4.2% and +2.8%). Compile: 11 schemas 7.5 ms cold
(median 0.71 ms, slowest 0.90 ms), cached 0.001 ms; the vocabulary, once per model, 308 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any

import jsonschema
from _common import (  # first: puts the repository on sys.path
    Broker,
    bench_client,
    bench_parser,
    model_path,
    running_consumer,
)

from consumer.engine.base import GenerationRequest
from consumer.engine.grammar import GrammarCache, GrammarVocabulary, JsonConstraint
from consumer.operations.extract import extract_prompt
from schemas import operation_request_adapter
from schemas.replies import ChatResult, ExtractResult, OperationReply
from tests.support.extract_corpus import SCHEMAS, TEXTS

ENGINE = {"backend": "llamacpp", "llamacpp": {"n_ctx": 1536, "slots": 8}}
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


@dataclass
class Case:
    name: str
    text: str

    @property
    def schema(self) -> dict[str, Any]:
        return SCHEMAS[self.name]

    def extract(self, max_tokens: int) -> dict[str, Any]:
        return {"operation": "extract", "tenant_id": "bench", "text": self.text,
                "schema": self.schema, "max_tokens": max_tokens}  # fmt: skip

    def plain_chat(self, max_tokens: int) -> dict[str, Any]:
        """The extract prompt itself, as a chat request with no constraint."""
        request = operation_request_adapter.validate_python(self.extract(max_tokens))
        messages = extract_prompt(request, max_tokens).messages  # type: ignore[arg-type]
        return {
            "operation": "chat", "tenant_id": "bench", "max_tokens": max_tokens,
            "temperature": 0.0,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
        }  # fmt: skip


@dataclass
class Run:
    replies: list[OperationReply] = field(default_factory=list)
    seconds: float = 0.0


def strict_json(content: str) -> Any:
    return json.loads(content)


def lenient_json(content: str) -> Any:
    text = _FENCE.sub("", content.strip())
    start, end = text.find("{"), text.rfind("}")
    return json.loads(text[start : end + 1] if start >= 0 and end > start else text)


def valid(value: Any, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


async def run(client: Any, bodies: list[dict[str, Any]], concurrency: int) -> Run:
    gate = asyncio.Semaphore(concurrency)
    replies: list[OperationReply | None] = [None] * len(bodies)

    async def one(index: int, body: dict[str, Any]) -> None:
        async with gate:
            replies[index] = await client.request(body, retries=0)

    started = time.perf_counter()
    await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    return Run([r for r in replies if r is not None], time.perf_counter() - started)


def validity(cases: list[Case], extract: Run, chat: Run) -> None:
    total = len(cases)
    ok = [(c, r) for c, r in zip(cases, extract.replies, strict=True) if r.status == "ok"]
    ok_valid = sum(
        1 for c, r in ok if isinstance(r.result, ExtractResult) and valid(r.result.data, c.schema)
    )
    codes = [r.error.code for r in extract.replies if r.error is not None]
    print(f"1. validity, {total} requests ({len(SCHEMAS)} schemas), greedy")
    share = 100 * ok_valid / max(len(ok), 1)
    print(f"  extract (constrained):  {len(ok):3d}/{total} ok, {ok_valid}/{len(ok)} of those "
          f"valid ({share:.0f}%); errors: {codes or 'none'}")  # fmt: skip
    for label, parse in (("strict", strict_json), ("lenient", lenient_json)):
        parsed = validated = 0
        for case, reply in zip(cases, chat.replies, strict=True):
            if reply.status != "ok" or not isinstance(reply.result, ChatResult):
                continue
            try:
                value = parse(reply.result.message.content)
            except ValueError:
                continue
            parsed += 1
            validated += valid(value, case.schema)
        print(f"  plain chat ({label:7s}):  {parsed:3d}/{total} parse as JSON, {validated:3d}/"
              f"{total} valid ({100 * validated / total:.0f}%), fail rate "
              f"{100 * (total - validated) / total:.0f}%")  # fmt: skip


@dataclass
class StepClock:
    """Time in decode steps (llama_decode batches of generated tokens only: prompt chunks
    would measure prefill, which depends on which slot's cache a prompt lands in) and in
    sampling, with the constrained part apart (installed around Context.decode and
    Sampler.__call__ for this benchmark only)."""

    decode_s: float = 0.0
    decoded: int = 0
    sample_s: float = 0.0
    grammar_s: float = 0.0
    grammar_tokens: int = 0

    def install(self) -> None:
        from consumer.engine.llamacpp import native, sampling

        clock = self
        decode, sample = native.Context.decode, sampling.Sampler.__call__

        def timed_decode(self: Any, tokens: Any) -> None:
            started = time.perf_counter()
            decode(self, tokens)
            if all(t.logits for t in tokens):  # every token generated: a decode step
                clock.decode_s += time.perf_counter() - started
                clock.decoded += len(tokens)

        def timed_sample(self: Any, logits: Any) -> int:
            started = time.perf_counter()
            token = sample(self, logits)
            spent = time.perf_counter() - started
            clock.sample_s += spent
            if self.grammar is not None:
                clock.grammar_s += spent
                clock.grammar_tokens += 1
            return token

        native.Context.decode = timed_decode  # type: ignore[method-assign]
        sampling.Sampler.__call__ = timed_sample  # type: ignore[method-assign]

    def reset(self) -> None:
        self.decode_s = self.sample_s = self.grammar_s = 0.0
        self.decoded = self.grammar_tokens = 0

    def rate(self) -> float:
        """Generated tokens per second of decoding and sampling them."""
        return self.decoded / (self.decode_s + self.sample_s)


async def timed_waves(
    engine: Any, clock: StepClock, requests: list[GenerationRequest], in_flight: int
) -> tuple[list[int], float]:
    """Run `requests` `in_flight` at a time: their output tokens, and the decode rate."""
    clock.reset()
    counts: list[int] = []
    for start in range(0, len(requests), in_flight):
        wave = requests[start : start + in_flight]
        counts += [g.output_tokens for g in await asyncio.gather(*map(engine.generate, wave))]
    return counts, clock.rate()


async def cost_per_token(cases: list[Case], rounds: int) -> None:
    from consumer.engine.llamacpp.backend import LlamaCppBackend
    from consumer.engine.llamacpp.native import usable_cores
    from consumer.engine.scheduler.engine import start_scheduled_engine

    clock = StepClock()
    clock.install()
    engine = await asyncio.to_thread(
        start_scheduled_engine,
        # Fixed threads: the thread tuner's exploration would add noise between variants.
        lambda: LlamaCppBackend(model_path(), slots=8, n_ctx=1536, n_threads=usable_cores()),
        max_queued=64,
    )
    try:
        constrained = []
        for case in cases[:8]:
            request = operation_request_adapter.validate_python(case.extract(128))
            constrained.append(extract_prompt(request, 128))  # type: ignore[arg-type]
        await timed_waves(engine, clock, constrained, 8)  # warm: prompts cached, compiled
        print("2. cost per token, in process (llama.cpp, 8 slots), greedy, "
              f"medians of {rounds} alternating rounds")  # fmt: skip
        for in_flight in (1, 8):
            prompts = constrained if in_flight == 8 else constrained[:4]
            with_rates: list[float] = []
            without_rates: list[float] = []
            shares: list[float] = []
            per_token_us: list[float] = []
            for _ in range(rounds):
                lengths, rate = await timed_waves(engine, clock, prompts, in_flight)
                with_rates.append(rate)
                shares.append(clock.grammar_s / (clock.decode_s + clock.sample_s - clock.grammar_s))
                per_token_us.append(clock.grammar_s / max(clock.grammar_tokens, 1) * 1e6)
                free = [
                    replace(r, constraint=None, max_tokens=max(n, 2))
                    for r, n in zip(prompts, lengths, strict=True)
                ]
                without_rates.append((await timed_waves(engine, clock, free, in_flight))[1])
            with_rate = statistics.median(with_rates)
            without_rate = statistics.median(without_rates)
            print(f"  {in_flight} in flight: {with_rate:6.1f} tok/s with a schema, "
                  f"{without_rate:6.1f} without: per token the schema costs "
                  f"{100 * (without_rate / with_rate - 1):+.1f}% (goal <= 15%)")  # fmt: skip
            print(f"    grammar work {statistics.median(per_token_us):5.0f} us per token: "
                  f"{100 * statistics.median(shares):+.1f}% on decoding and sampling the same "
                  "tokens")  # fmt: skip
    finally:
        await engine.close()


def compile_times() -> None:
    import llama_cpp

    model = llama_cpp.Llama(model_path=str(model_path()), vocab_only=True, verbose=False)
    started = time.perf_counter()
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    vocabulary = GrammarVocabulary.from_llamacpp(vocab, [llama_cpp.llama_vocab_eot(vocab)])
    built_ms = (time.perf_counter() - started) * 1000
    cache = GrammarCache(vocabulary)
    constraints = {name: JsonConstraint.for_schema(schema) for name, schema in SCHEMAS.items()}
    cold: dict[str, float] = {}
    for name, constraint in constraints.items():
        started = time.perf_counter()
        cache.compile(constraint)
        cold[name] = (time.perf_counter() - started) * 1000
    cached = []
    starts = []
    for constraint in constraints.values():
        started = time.perf_counter()
        cache.compile(constraint)
        cached.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        cache.matcher(constraint)
        starts.append((time.perf_counter() - started) * 1000)
    slowest = max(cold, key=cold.__getitem__)
    print(f"3. grammar compile, {len(constraints)} schemas, this process")
    print(f"  vocabulary from the GGUF (once per model): {built_ms:7.1f} ms")
    print(
        f"  cold:   total {sum(cold.values()):7.1f} ms, "
        f"median {statistics.median(cold.values()):6.2f} ms, "
        f"slowest {cold[slowest]:6.2f} ms ({slowest})"
    )
    print(f"  cached: total {sum(cached):7.3f} ms, median {statistics.median(cached):6.3f} ms")
    print(f"  a sequence's matcher from the cache: median {statistics.median(starts):6.3f} ms")
    print(f"  cache: {cache.details()}")  # fmt: skip
    model.close()


async def bench(args: argparse.Namespace) -> None:
    cases = [Case(name, text) for name in SCHEMAS for text in TEXTS[name][: args.texts]]
    extracts = [c.extract(args.max_tokens) for c in cases]
    chats = [c.plain_chat(args.max_tokens) for c in cases]
    if not args.skip_kafka:
        with Broker.start() as broker:
            async with (
                running_consumer(broker, {"engine": ENGINE}, name="structured") as (_, topics),
                bench_client(broker, topics) as client,
            ):
                extract = await run(client, extracts, 8)
                chat = await run(client, chats, 8)
        validity(cases, extract, chat)
    await cost_per_token(cases, args.rounds)
    compile_times()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--texts", type=int, default=2, help="texts per schema (at most 2)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="cost rounds per variant")
    parser.add_argument("--skip-kafka", action="store_true", help="sections 2 and 3 only")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()

"""Which grammar library constrains JSON Schema output: xgrammar against llguidance, measured.

Prints, on this CPU, with the packaged SmolLM2-135M GGUF's vocabulary (49,152 tokens, read
from the GGUF with llama.cpp's `llama_token_to_piece`, control tokens marked special):
1. Tokenizer build time (once per process).
2. Compile time of a realistic schema (an invoice: nested objects, an array of objects, enums,
   bounded numbers, a date format, a pattern, optional fields), cold and cached, and the time
   to start a per-sequence matcher from the compiled grammar.
3. Per-token mask cost: walking a valid instance token by token, the time to compute the next
   token's mask, apply it to a float32 logits row, and advance the matcher (mean, p50, p99).
4. JSON Schema coverage: for each keyword, whether the library compiles a schema using it
   and whether it then accepts a valid instance and rejects an invalid one (enforced), compiles
   but does not enforce it (ignored), or refuses it.

Run: .venv/bin/python tests/bench/bench_grammar_libs.py [--repeat 5]
(xgrammar is not a dependency of opstream: `pip install xgrammar` first, or it is skipped.)
Not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np

from consumer.engine.model_files import packaged_smollm2

INVOICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "invoice_number": {"type": "string", "pattern": "^INV-[0-9]{4,8}$"},
        "issued": {"type": "string", "format": "date"},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP", "CHF"]},
        "seller": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 80},
                "vat_id": {"type": "string"},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string"},
                        "city": {"type": "string"},
                        "country": {"type": "string", "minLength": 2, "maxLength": 2},
                    },
                    "required": ["city", "country"],
                },
            },
            "required": ["name"],
        },
        "lines": {
            "type": "array",
            "minItems": 1,
            "maxItems": 20,
            "items": {
                "type": "object",
                "properties": {
                    "description": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 10000},
                    "unit_price": {"type": "number", "minimum": 0},
                    "vat_rate": {"type": "number", "minimum": 0, "maximum": 0.5},
                },
                "required": ["description", "quantity", "unit_price"],
            },
        },
        "paid": {"type": "boolean"},
        "notes": {"type": "string"},
    },
    "required": ["invoice_number", "currency", "lines", "paid"],
}
INVOICE_INSTANCE = {
    "invoice_number": "INV-20240117",
    "issued": "2024-01-17",
    "currency": "EUR",
    "seller": {
        "name": "Acme Tools GmbH",
        "address": {"street": "Hauptstrasse 5", "city": "Berlin", "country": "DE"},
    },
    "lines": [
        {"description": "Hammer, steel", "quantity": 3, "unit_price": 12.5, "vat_rate": 0.19},
        {"description": "Nails (box of 200)", "quantity": 10, "unit_price": 3.99},
        {"description": "Delivery", "quantity": 1, "unit_price": 7},
    ],
    "paid": False,
}

# keyword -> (schema, a valid instance, an invalid instance that only this keyword rules out)
COVERAGE: dict[str, tuple[dict[str, Any], Any, Any]] = {
    "enum": ({"enum": ["a", "b"]}, "a", "c"),
    "const": ({"const": "x"}, "x", "y"),
    "pattern": ({"type": "string", "pattern": "^[A-Z]{3}$"}, "ABC", "ABCD"),
    "format:date": ({"type": "string", "format": "date"}, "2024-02-29", "yesterday"),
    "format:date-time": (
        {"type": "string", "format": "date-time"},
        "2024-02-29T10:00:00Z",
        "2024-02-29",
    ),
    "format:email": ({"type": "string", "format": "email"}, "a@b.io", "not an email"),
    "format:uuid": (
        {"type": "string", "format": "uuid"},
        "123e4567-e89b-12d3-a456-426614174000",
        "123",
    ),
    "format:uri": ({"type": "string", "format": "uri"}, "https://x.io/a", "no uri"),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 3}, "ab", "abcd"),
    "integer min/max": ({"type": "integer", "minimum": 1, "maximum": 10}, 10, 11),
    "number exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, 0.5, 0),
    "number min/max": ({"type": "number", "minimum": -1.5, "maximum": 2.5}, 2.5, 2.6),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 10, 7),
    "minItems/maxItems": ({"type": "array", "items": {}, "minItems": 1, "maxItems": 2}, [1], []),
    "uniqueItems": (
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        [1],
        [1, 1],
    ),
    "prefixItems": (
        {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
        [1, "a"],
        ["a", 1],
    ),
    "required": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"a": 1},
        {},
    ),
    "additionalProperties:false": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        {"a": 1},
        {"a": 1, "b": 2},
    ),
    "additionalProperties:schema": (
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"k": 1},
        {"k": "v"},
    ),
    "min/maxProperties": (
        {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 1},
        {"k": 1},
        {"k": 1, "j": 2},
    ),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "x"),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, 1, True),
    "allOf": (
        {"allOf": [{"type": "integer", "minimum": 0}, {"maximum": 5}]},
        3,
        6,
    ),
    "type list (nullable)": ({"type": ["string", "null"]}, None, 1),
    "$ref/$defs": (
        {
            "$defs": {"p": {"type": "integer"}},
            "type": "object",
            "properties": {"x": {"$ref": "#/$defs/p"}},
        },
        {"x": 1},
        {"x": "a"},
    ),
    "recursive $ref": (
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                    "required": ["c"],
                    "additionalProperties": False,
                }
            },
            "$ref": "#/$defs/node",
        },
        {"c": [{"c": []}]},
        {"c": [{}]},
    ),
    "not": ({"type": "integer", "not": {"const": 3}}, 2, 3),
    "if/then/else": (
        {"type": "integer", "if": {"minimum": 5}, "then": {"multipleOf": 2}},
        6,
        7,
    ),
    "patternProperties": (
        {
            "type": "object",
            "patternProperties": {"^x": {"type": "integer"}},
            "additionalProperties": False,
        },
        {"xa": 1},
        {"ya": 1},
    ),
    "dependentRequired": (
        {"type": "object", "properties": {"a": {}, "b": {}}, "dependentRequired": {"a": ["b"]}},
        {"a": 1, "b": 2},
        {"a": 1},
    ),
}


# ── the vocabulary, from the GGUF ──


def gguf_vocabulary() -> tuple[list[bytes], list[int], int, llama_cpp.Llama]:
    """Token bytes by id, the control-token ids, the end-of-turn id and the vocab-only model."""
    llm = llama_cpp.Llama(model_path=str(packaged_smollm2()), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buffer = ctypes.create_string_buffer(256)
    tokens: list[bytes] = []
    special: list[int] = []
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, 256, 0, True)
        tokens.append(bytes(buffer[:n]))
        if llama_cpp.llama_token_get_attr(vocab, token) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
            special.append(token)
    return tokens, special, int(llama_cpp.llama_vocab_eot(vocab)), llm


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return (time.perf_counter() - start) * 1000, value


def describe(samples_ms: list[float]) -> str:
    ordered = sorted(samples_ms)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    mean, p50 = statistics.fmean(ordered), ordered[len(ordered) // 2]
    return f"mean {mean * 1000:7.1f} us  p50 {p50 * 1000:7.1f} us  p99 {p99 * 1000:7.1f} us"


# ── the two libraries behind one shape ──


class Xgrammar:
    name = "xgrammar"

    def __init__(
        self, tokens: list[bytes], special: list[int], eot: int, llm: llama_cpp.Llama
    ) -> None:
        import xgrammar

        self.xgr = xgrammar
        # Control tokens as empty strings: xgrammar treats those as special, never inside text.
        vocab = [b"" if i in set(special) else t for i, t in enumerate(tokens)]
        self.info = xgrammar.TokenizerInfo(
            vocab, xgrammar.VocabType.RAW, vocab_size=len(tokens), stop_token_ids=[eot]
        )
        self.vocab_size = len(tokens)

    def compiler(self, cache: bool) -> Any:
        return self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=cache)

    def compile(self, compiler: Any, schema: dict[str, Any]) -> Any:
        return compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def new_bitmask(self) -> np.ndarray:
        return np.full((1, (self.vocab_size + 31) // 32), -1, dtype=np.int32)

    def fill(self, matcher: Any, bitmask: np.ndarray) -> None:
        import torch

        matcher.fill_next_token_bitmask(torch.from_numpy(bitmask))

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def accepts_text(self, matcher: Any, text: str, tokenize: Callable[[str], list[int]]) -> bool:
        return bool(matcher.accept_string(text)) and bool(matcher.is_completed())


class Llguidance:
    name = "llguidance"

    def __init__(
        self, tokens: list[bytes], special: list[int], eot: int, llm: llama_cpp.Llama
    ) -> None:
        import llguidance
        import llguidance.llamacpp

        self.llg = llguidance
        # llguidance's own reader of a llama.cpp vocabulary (control tokens marked special,
        # llama.cpp's tokenizer for its token healing).
        self.tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(
            llama_cpp.llama_model_get_vocab(llm.model), eos_token=eot
        )
        self.vocab_size = len(tokens)

    def compiler(self, cache: bool) -> Any:
        return {} if cache else None

    def compile(self, compiler: Any, schema: dict[str, Any]) -> Any:
        key = json.dumps(schema)  # not sorted: the properties' order is the output's
        if compiler is not None and key in compiler:
            return compiler[key]
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            key, defaults={"whitespace_flexible": False}
        )
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        if compiler is not None:
            compiler[key] = matcher
        return matcher

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def new_bitmask(self) -> np.ndarray:
        return np.full((1, (self.vocab_size + 31) // 32), -1, dtype=np.int32)

    def fill(self, matcher: Any, bitmask: np.ndarray) -> None:
        matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def accepts_text(self, matcher: Any, text: str, tokenize: Callable[[str], list[int]]) -> bool:
        tokens = self.tokenizer.tokenize_str(text)
        return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


def apply_bitmask(logits: np.ndarray, bitmask: np.ndarray) -> None:
    """The mask application opstream uses: unpack the bits, -inf where a token is not allowed."""
    allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[: logits.shape[-1]]
    logits[allowed == 0] = -np.inf


def measure(lib: Any, repeat: int, instance_tokens: list[int]) -> None:
    print(f"\n== {lib.name} ==")
    cold = [
        timed(lambda: lib.compile(lib.compiler(False), INVOICE_SCHEMA))[0] for _ in range(repeat)
    ]
    cache = lib.compiler(True)
    lib.compile(cache, INVOICE_SCHEMA)
    cached = [timed(lambda: lib.compile(cache, INVOICE_SCHEMA))[0] for _ in range(repeat)]
    compiled = lib.compile(cache, INVOICE_SCHEMA)
    start = [timed(lambda: lib.matcher(compiled))[0] for _ in range(repeat)]
    print(f"compile invoice schema, cold: median {statistics.median(cold):8.2f} ms")
    print(f"compile invoice schema, cached: median {statistics.median(cached):8.3f} ms")
    print(f"start a matcher from it:        median {statistics.median(start):8.3f} ms")

    rng = np.random.default_rng(0)
    logits = rng.standard_normal(lib.vocab_size).astype(np.float32)
    fill_ms: list[float] = []
    apply_ms: list[float] = []
    advance_ms: list[float] = []
    for _ in range(repeat):
        matcher = lib.matcher(compiled)
        bitmask = lib.new_bitmask()
        for token in instance_tokens:
            fill_ms.append(timed(lambda m=matcher, b=bitmask: lib.fill(m, b))[0])
            row = logits.copy()
            apply_ms.append(timed(lambda r=row, b=bitmask: apply_bitmask(r, b[0]))[0])
            allowed = bool(np.unpackbits(bitmask[0].view(np.uint8), bitorder="little")[token])
            ok = timed(lambda m=matcher, t=token: lib.advance(m, t))
            advance_ms.append(ok[0])
            if not (ok[1] and allowed):
                print(f"  !! token {token} refused (allowed by mask: {allowed})")
                break
    print(f"per token, compute mask:   {describe(fill_ms)}")
    print(f"per token, apply to logits: {describe(apply_ms)}")
    print(f"per token, advance matcher: {describe(advance_ms)}")
    total = [a + b + c for a, b, c in zip(fill_ms, apply_ms, advance_ms, strict=False)]
    print(f"per token, all three:       {describe(total)}")


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def coverage(lib: Any, tokenize: Callable[[str], list[int]]) -> dict[str, str]:
    verdicts: dict[str, str] = {}
    cache = lib.compiler(False)
    for keyword, (schema, good, bad) in COVERAGE.items():
        try:
            compiled = lib.compile(cache, schema)
        except Exception as error:  # the verdict is the point: any refusal counts
            verdicts[keyword] = f"refused ({str(error).splitlines()[0][:60]})"
            continue
        good_ok = lib.accepts_text(lib.matcher(compiled), compact(good), tokenize)
        bad_ok = lib.accepts_text(lib.matcher(compiled), compact(bad), tokenize)
        if good_ok and not bad_ok:
            verdicts[keyword] = "enforced"
        elif good_ok:
            verdicts[keyword] = "ignored"
        else:
            verdicts[keyword] = "rejects valid"
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    tokens, special, eot, llm = gguf_vocabulary()

    def tokenize(text: str) -> list[int]:
        return list(llm.tokenize(text.encode(), add_bos=False, special=False))

    instance_tokens = [*tokenize(compact(INVOICE_INSTANCE)), eot]
    print(
        f"vocabulary: {len(tokens)} tokens, {len(special)} control;"
        f" instance: {len(instance_tokens)} tokens"
    )
    libs: list[Any] = []
    for cls in (Xgrammar, Llguidance):
        if importlib.util.find_spec(cls.name) is None:
            print(f"{cls.name}: not installed, skipped")
            continue
        ms, lib = timed(lambda c=cls: c(tokens, special, eot, llm))
        print(f"{cls.name}: tokenizer build {ms:.0f} ms")
        libs.append(lib)
    for lib in libs:
        measure(lib, args.repeat, instance_tokens)
    print("\n== JSON Schema coverage ==")
    table = {lib.name: coverage(lib, tokenize) for lib in libs}
    print(f"{'keyword':30s} " + " ".join(f"{lib.name:40s}" for lib in libs))
    for keyword in COVERAGE:
        print(f"{keyword:30s} " + " ".join(f"{table[lib.name][keyword]:40s}" for lib in libs))


if __name__ == "__main__":
    main()

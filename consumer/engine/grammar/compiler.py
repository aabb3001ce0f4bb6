"""Compiling a JSON constraint into a grammar for one vocabulary, cached by the schema's hash
(bounded, least recently used out first; hits and misses counted)."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance

from consumer.engine.grammar.constraint import JsonConstraint
from consumer.engine.grammar.errors import GrammarRefused
from consumer.engine.grammar.matcher import SequenceMatcher
from consumer.engine.grammar.vocabulary import GrammarVocabulary

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Compact JSON, no free whitespace: fewer tokens, and no output that runs on in blank space.
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
# Bounds per mask step, below llguidance's defaults (200k lexer fuel is ~14 ms): a schema
# whose masks cost more fails its request instead of slowing every sequence in the batch.


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(
        step_lexer_fuel=100_000, step_max_items=20_000, verbose_errors=False
    )


_ERROR_CHARS = 300


@dataclass
class CacheStats:
    """What the cache has done since the engine started (monotonic)."""

    hits: int = 0
    misses: int = 0
    refused: int = 0
    compile_ms: float = 0.0  # total time spent compiling (misses)

    def as_dict(self, size: int, capacity: int) -> dict[str, object]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "refused": self.refused,
            "compile_ms": round(self.compile_ms, 3),
            "size": size,
            "capacity": capacity,
        }


def closed_objects(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object schema that lists its
    `properties` and says nothing about others (OpenAI's strict mode does the same).

    Every output it allows is valid against the original; the model is kept to the named
    properties instead of inventing more.
    """
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed: dict[str, Any] = {}
    for keyword, value in schema.items():
        if keyword in ("enum", "const", "default", "examples"):
            closed[keyword] = value
        elif keyword in ("properties", "patternProperties", "$defs", "definitions"):
            closed[keyword] = (
                {name: closed_objects(sub) for name, sub in value.items()}
                if isinstance(value, dict)
                else value
            )
        else:
            closed[keyword] = closed_objects(value)
    if (
        "properties" in closed
        and "additionalProperties" not in closed
        and "patternProperties" not in closed
    ):
        closed["additionalProperties"] = False
    return closed


class GrammarCache:
    """Compiled grammars of one vocabulary by constraint key; safe from any thread.

    `compile` is what a request's admission calls (GrammarRefused for a schema the engine
    cannot enforce); `matcher` is what a sequence starts from when it is scheduled.
    """

    def __init__(self, vocabulary: GrammarVocabulary, *, capacity: int = 128) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.vocabulary = vocabulary
        self.capacity = capacity
        self.stats = CacheStats()
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._compiled)

    def details(self) -> dict[str, object]:
        return self.stats.as_dict(len(self._compiled), self.capacity)

    def compile(self, constraint: JsonConstraint) -> llguidance.LLMatcher:
        """The pristine matcher of `constraint` (compiled now or found in the cache)."""
        with self._lock:
            found = self._compiled.get(constraint.key)
            if found is not None:
                self._compiled.move_to_end(constraint.key)
                self.stats.hits += 1
                return found
        started = time.perf_counter()
        compiled = self._build(constraint)
        with self._lock:
            self.stats.misses += 1
            self.stats.compile_ms += (time.perf_counter() - started) * 1000
            self._compiled[constraint.key] = compiled
            self._compiled.move_to_end(constraint.key)
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, constraint: JsonConstraint) -> SequenceMatcher:
        """A fresh matcher for one sequence's output."""
        return SequenceMatcher(self.compile(constraint).deep_copy(), self.vocabulary)

    def _build(self, constraint: JsonConstraint) -> llguidance.LLMatcher:
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(closed_objects(constraint.schema()), separators=(",", ":")),
                defaults=_JSON_OPTIONS,
            )
            matcher = llguidance.LLMatcher(
                self.vocabulary.tokenizer,
                grammar,
                log_level=0,
                limits=_limits(),
            )
        except ValueError as exc:
            self._refused()
            raise GrammarRefused(f"the schema cannot be compiled: {_short(str(exc))}") from exc
        if matcher.is_error():
            self._refused()
            raise GrammarRefused(f"the schema cannot be compiled: {_short(matcher.get_error())}")
        return matcher

    def _refused(self) -> None:
        with self._lock:
            self.stats.refused += 1


def _short(message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return first[:_ERROR_CHARS]

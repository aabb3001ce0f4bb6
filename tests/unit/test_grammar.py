"""Constrained decoding's shared core (consumer.engine.grammar) on SmolLM2's real vocabulary:
compiling and caching, per-sequence masks on numpy logits (llama.cpp) and torch rows
(exllamav2), greedy and sampled, every finished output valid against its schema."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jsonschema
import numpy as np
import pytest

from consumer.engine.grammar import (
    GrammarCache,
    GrammarRefused,
    GrammarVocabulary,
    JsonConstraint,
    SequenceMatcher,
    allowed_tokens,
    closed_objects,
    mask_numpy,
    mask_torch_rows,
)
from tests.support.extract_corpus import SCHEMAS

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def vocabulary(vocab_model: Any) -> GrammarVocabulary:
    vocab = llama_cpp.llama_model_get_vocab(vocab_model.model)
    return GrammarVocabulary.from_llamacpp(vocab, [llama_cpp.llama_vocab_eot(vocab), 2])


@pytest.fixture
def cache(vocabulary: GrammarVocabulary) -> GrammarCache:
    return GrammarCache(vocabulary, capacity=4)


def pieces(vocab_model: Any) -> Callable[[list[int]], str]:
    def decode(tokens: list[int]) -> str:
        return str(vocab_model.detokenize(tokens).decode("utf-8"))

    return decode


def closer_bias(vocab_model: Any, size: int) -> np.ndarray:
    """Random-logit 'models' favour tokens that end strings and containers, so outputs end."""
    bias = np.zeros(size, dtype=np.float32)
    for text in ('"', "}", "]", ",", '",', '"}', "1", "0", "true", "@", ".", "a"):
        for token in vocab_model.tokenize(text.encode(), add_bos=False, special=False):
            bias[token] = 6.0
    return bias


def generate(
    matcher: SequenceMatcher,
    logits_for: Callable[[int], np.ndarray],
    pick: Callable[[np.ndarray], int],
    max_tokens: int = 1000,
) -> list[int]:
    tokens: list[int] = []
    stops = matcher.vocabulary.stop_ids
    for step in range(max_tokens):
        logits = mask_numpy(logits_for(step), matcher.mask())
        token = pick(logits)
        matcher.advance(token)
        if token in stops:
            break
        tokens.append(token)
        if matcher.complete:
            break
    return tokens


def test_compiled_grammars_are_cached_by_schema_hash_with_hits_misses_and_a_bound(
    cache: GrammarCache,
) -> None:
    person = JsonConstraint.for_schema(SCHEMAS["person"])
    first = cache.compile(person)
    assert cache.compile(JsonConstraint.for_schema(dict(SCHEMAS["person"]))) is first
    assert (cache.stats.misses, cache.stats.hits) == (1, 1)
    for name in ("contact", "order", "event", "tags", "product"):
        cache.compile(JsonConstraint.for_schema(SCHEMAS[name]))
    assert len(cache) == 4  # bounded: the least recently used went first
    cache.compile(person)
    assert cache.stats.misses == 7 and cache.details()["size"] == 4


def test_property_order_is_part_of_the_key() -> None:
    a = JsonConstraint.for_schema({"type": "object", "properties": {"x": {}, "y": {}}})
    b = JsonConstraint.for_schema({"type": "object", "properties": {"y": {}, "x": {}}})
    assert a.key != b.key


def test_a_schema_the_engine_cannot_compile_is_refused(cache: GrammarCache) -> None:
    broken = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}
    with pytest.raises(GrammarRefused, match="cannot be compiled"):
        cache.compile(JsonConstraint.for_schema(broken))
    assert cache.stats.refused == 1


def test_objects_are_closed_to_unnamed_properties_without_changing_what_is_valid() -> None:
    closed = closed_objects(SCHEMAS["order"])
    assert closed["additionalProperties"] is False
    assert closed["properties"]["items"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in SCHEMAS["order"]
    assert closed_objects({"type": "object"}) == {"type": "object"}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_masked_decoding_of_random_logits_yields_json_valid_against_its_schema(
    name: str, sampled: bool, cache: GrammarCache, vocab_model: Any
) -> None:
    schema = SCHEMAS[name]
    matcher = cache.matcher(JsonConstraint.for_schema(schema))
    size = matcher.vocabulary.size
    rng = np.random.default_rng(hash(name) % 2**32)
    bias = closer_bias(vocab_model, size)

    def logits_for(step: int) -> np.ndarray:
        return rng.standard_normal(size).astype(np.float32) * 3 + bias

    def pick(logits: np.ndarray) -> int:
        if not sampled:
            return int(np.argmax(logits))
        probs = np.exp(logits - logits.max())
        return int(rng.choice(size, p=probs / probs.sum()))

    tokens = generate(matcher, logits_for, pick)
    assert matcher.complete or matcher.accepting
    data = json.loads(pieces(vocab_model)(tokens))
    jsonschema.validate(data, schema)


def test_a_complete_output_allows_only_stop_tokens(cache: GrammarCache, vocab_model: Any) -> None:
    matcher = cache.matcher(JsonConstraint.for_schema(SCHEMAS["person"]))
    for token in vocab_model.tokenize(b'{"name":"Al","age":3', add_bos=False, special=False):
        matcher.advance(token)
    assert not matcher.accepting and not matcher.complete
    allowed = set(np.flatnonzero(allowed_tokens(matcher.mask(), matcher.vocabulary.size)))
    assert matcher.vocabulary.stop_ids.isdisjoint(allowed) and len(allowed) > 1  # digits, "}"
    for token in vocab_model.tokenize(b"}", add_bos=False, special=False):
        matcher.advance(token)
    assert matcher.complete
    allowed = set(np.flatnonzero(allowed_tokens(matcher.mask(), matcher.vocabulary.size)))
    assert allowed <= set(matcher.vocabulary.stop_ids)


def test_a_failed_matcher_ends_its_sequence_instead_of_raising_into_the_batch(
    cache: GrammarCache, vocab_model: Any
) -> None:
    matcher = cache.matcher(JsonConstraint.for_schema(SCHEMAS["person"]))
    (token,) = vocab_model.tokenize(b"hello", add_bos=False, special=False)[:1]
    matcher.advance(token)  # not allowed: a bug upstream, or a per-step limit
    assert matcher.failed and matcher.complete and not matcher.accepting
    allowed = set(np.flatnonzero(allowed_tokens(matcher.mask(), matcher.vocabulary.size)))
    assert allowed == set(matcher.vocabulary.stop_ids)
    matcher.advance(token)  # and it stays failed, quietly


def test_torch_rows_are_masked_each_by_its_own_matcher(
    cache: GrammarCache, vocab_model: Any
) -> None:
    torch = pytest.importorskip("torch")
    size = cache.vocabulary.size
    width = size + 64  # a model head wider than the tokenizer: the extra ids are never allowed
    logits = torch.randn(3, width)
    person = cache.matcher(JsonConstraint.for_schema(SCHEMAS["person"]))
    tags = cache.matcher(JsonConstraint.for_schema(SCHEMAS["tags"]))
    for token in vocab_model.tokenize(b'{"name":"', add_bos=False, special=False):
        person.advance(token)
    masks = [(0, person.mask()), (2, tags.mask())]
    masked = mask_torch_rows(logits, masks)
    assert torch.equal(masked[1], logits[1])  # an unconstrained row is untouched
    for row, mask in masks:
        expected = mask_numpy(logits[row, :size].numpy(), mask)
        assert np.array_equal(masked[row, :size].numpy(), expected)
        assert bool(torch.isinf(masked[row, size:]).all())


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a|aa)*(b+)+$"}}},
        {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(.{100}){100}$"}}},
        {"type": "object", "properties": {"a": {"type": "string", "maxLength": 10**9}}},
        {"type": "object", "properties": {"a": {"enum": [f"value {i}" * 3 for i in range(256)]}}},
    ],
    ids=["nested-quantifiers", "repetition-bomb", "huge-maxLength", "largest-enum"],
)
def test_hostile_schemas_within_the_caps_compile_and_mask_in_bounded_time(
    schema: dict[str, Any], cache: GrammarCache, vocab_model: Any
) -> None:
    started = time.perf_counter()
    matcher = cache.matcher(JsonConstraint.for_schema(schema))
    compiled_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    size = matcher.vocabulary.size
    bias = closer_bias(vocab_model, size)
    slowest = 0.0
    for _ in range(60):
        step = time.perf_counter()
        logits = mask_numpy(rng.standard_normal(size).astype(np.float32) + bias, matcher.mask())
        token = int(np.argmax(logits))
        matcher.advance(token)  # a per-step limit tripped: the sequence ends, nothing hangs
        slowest = max(slowest, time.perf_counter() - step)
        if token in matcher.vocabulary.stop_ids or matcher.complete:
            break
    # Generous for a shared 2-core machine; the point is "milliseconds", not "minutes".
    assert compiled_s < 2.0 and slowest < 0.5


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_the_llamacpp_sampler_masks_advances_and_completes(
    temperature: float, cache: GrammarCache, vocab_model: Any
) -> None:
    from consumer.engine.llamacpp.sampling import Sampler

    schema = SCHEMAS["sentiment"]
    sampler = Sampler(
        temperature=temperature,
        top_p=0.9,
        seed=7,
        grammar=cache.matcher(JsonConstraint.for_schema(schema)),
    )
    rng = np.random.default_rng(3)
    bias = closer_bias(vocab_model, cache.vocabulary.size)
    tokens: list[int] = []
    while not sampler.complete and len(tokens) < 1000:
        tokens.append(sampler(rng.standard_normal(cache.vocabulary.size).astype(np.float32) + bias))
    assert sampler.complete
    jsonschema.validate(json.loads(pieces(vocab_model)(tokens)), schema)

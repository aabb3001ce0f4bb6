"""Constrained decoding on exllamav2's paths, on CPU torch: a padded static batch whose rows
follow different schemas (and one row none) yields JSON valid against its own schema per row,
greedy and sampled; the paged generator's filter masks a row the same way. The masks are the
same code the llama.cpp backend uses (consumer.engine.grammar), on SmolLM2's vocabulary."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import numpy as np
import pytest

torch = pytest.importorskip("torch")
llama_cpp = pytest.importorskip("llama_cpp")

from consumer.engine.base import ChatMessage, GenerationRequest  # noqa: E402
from consumer.engine.exllamav2.grammar_filter import GrammarFilter  # noqa: E402
from consumer.engine.exllamav2.runner import GenTicket, StaticBatch  # noqa: E402
from consumer.engine.grammar import (  # noqa: E402
    GrammarCache,
    GrammarVocabulary,
    JsonConstraint,
    allowed_tokens,
)
from tests.support.extract_corpus import SCHEMAS  # noqa: E402

HEAD_PADDING = 64  # the model's head is wider than the tokenizer, as Qwen2.5's is
MESSAGES = (ChatMessage("user", "x"),)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Batch-wide ops on ~300k floats: a second thread only waits on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(vocab_model: Any) -> GrammarCache:
    vocab = llama_cpp.llama_model_get_vocab(vocab_model.model)
    return GrammarCache(GrammarVocabulary.from_llamacpp(vocab, [2]))


class FakeCache:
    def __init__(self, batch_size: int, max_seq_len: int) -> None:
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.current_seq_len = 0

    def all_tensors(self) -> list[Any]:
        return []


class RandomLogitsModel:
    """exllamav2's forward contract with random logits that favour tokens ending strings
    and containers (so a random 'model' finishes its JSON in a few hundred tokens)."""

    def __init__(self, width: int, bias: torch.Tensor, seed: int) -> None:
        self.width = width
        self.bias = bias
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, input_ids: Any, cache: FakeCache, **_: Any) -> Any:
        batch, columns = input_ids.shape
        cache.current_seq_len += columns
        noise = torch.randn((batch, columns, self.width), generator=self.generator) * 3
        return (noise + self.bias).half()


def closer_bias(vocab_model: Any, width: int) -> torch.Tensor:
    bias = torch.zeros(width)
    for text in ('"', "}", "]", ",", '",', '"}', "1", "0", "true", "@", ".", "a"):
        for token in vocab_model.tokenize(text.encode(), add_bos=False, special=False):
            bias[token] = 6.0
    return bias


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_a_padded_batch_with_a_schema_per_row_yields_valid_json_per_row(
    temperature: float, cache: GrammarCache, vocab_model: Any
) -> None:
    names = ["person", "order", "sentiment", None, "meeting", "product"]
    width = cache.vocabulary.size + HEAD_PADDING
    tickets = []
    for index, name in enumerate(names):
        constraint = None if name is None else JsonConstraint.for_schema(SCHEMAS[name])
        request = GenerationRequest(
            messages=MESSAGES,
            max_tokens=1000 if name else 12,
            temperature=temperature,
            seed=index,
            constraint=constraint,
        )
        prompt = list(range(5, 5 + 2 + index))  # different lengths: left padding differs
        grammar = None if constraint is None else cache.matcher(constraint)
        tickets.append(GenTicket(ids=prompt, request=request, grammar=grammar))

    def decode(tokens: list[int]) -> str:
        return str(vocab_model.detokenize(tokens).decode("utf-8", errors="replace"))

    batch = StaticBatch(
        RandomLogitsModel(width, closer_bias(vocab_model, width), seed=11),
        FakeCache(len(tickets), 1100),
        tickets,
        pad_id=0,
        stop_ids=frozenset(cache.vocabulary.stop_ids),
        decode=decode,
        vocab_size=cache.vocabulary.size,
    )
    batch.prefill()
    steps = 0
    while not batch.finished and steps < 1000:
        batch.step()
        steps += 1
    assert batch.finished
    results = dict(enumerate(g for _, g in batch.results()))
    for index, name in enumerate(names):
        generation = results[index]
        if name is None:
            assert generation.finish_reason == "length"  # the unconstrained row ran free
            continue
        assert generation.finish_reason == "stop", name
        jsonschema.validate(json.loads(generation.text), SCHEMAS[name])
        assert generation.output_tokens == len(batch.rows[index].tokens)


def test_the_paged_filter_masks_one_row_and_follows_the_sampled_tokens(
    cache: GrammarCache, vocab_model: Any
) -> None:
    schema = SCHEMAS["tags"]
    grammar = cache.matcher(JsonConstraint.for_schema(schema))
    width = cache.vocabulary.size + HEAD_PADDING
    bias = closer_bias(vocab_model, width)
    rng = torch.Generator().manual_seed(5)
    chosen: list[int] = []
    flt = GrammarFilter(grammar)
    flt.begin("")
    for _ in range(1000):
        assert flt.can_mask_logits() and flt.get_next(mask=True) is True
        logits = flt.mask_logits(torch.randn(width, generator=rng) * 3 + bias)
        token = int(torch.argmax(logits))
        allowed = allowed_tokens(grammar.mask(), width)
        assert allowed[token] and bool(torch.isinf(logits[~torch.from_numpy(allowed)]).all())
        flt.feed(torch.tensor([[token]]))
        if token in cache.vocabulary.stop_ids:
            break
        chosen.append(token)
    assert grammar.complete
    data = json.loads(vocab_model.detokenize(chosen).decode())
    jsonschema.validate(data, schema)
    assert np.all(
        allowed_tokens(grammar.mask(), cache.vocabulary.size)[list(grammar.vocabulary.stop_ids)]
    )

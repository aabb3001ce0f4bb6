"""Constrained decoding: JSON Schema output on every engine (one grammar library, llguidance;
one mask per sequence, applied in our own sampling step).

A request's `JsonConstraint` is compiled once per schema (`GrammarCache`, by hash) at
admission; each generating sequence gets a `SequenceMatcher`, asks it for the next token's
mask, applies it to its logits (`mask_numpy`, `mask_torch_rows`), advances it with the
sampled token and stops when it is `complete`.
"""

from consumer.engine.grammar.compiler import CacheStats, GrammarCache, closed_objects
from consumer.engine.grammar.constraint import JsonConstraint
from consumer.engine.grammar.errors import GrammarRefused
from consumer.engine.grammar.masking import allowed_tokens, mask_numpy, mask_torch_rows
from consumer.engine.grammar.matcher import SequenceMatcher, TokenMask
from consumer.engine.grammar.vocabulary import GrammarVocabulary

__all__ = [
    "CacheStats",
    "GrammarCache",
    "GrammarRefused",
    "GrammarVocabulary",
    "JsonConstraint",
    "SequenceMatcher",
    "TokenMask",
    "allowed_tokens",
    "closed_objects",
    "mask_numpy",
    "mask_torch_rows",
]

"""The model's vocabulary as the grammar engine (llguidance) sees it: token bytes, which
tokens end the output, and a tokenizer for its token healing. Built once per loaded model."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import llguidance


class GrammarVocabulary:
    """A loaded model's tokens for masks: `size` ids (a mask has one bit per id), of which
    `stop_ids` end an output (allowed once the JSON is complete, and only then)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, stop_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.size: int = tokenizer.vocab_size
        self.stop_ids = frozenset(stop_ids)

    @property
    def mask_words(self) -> int:
        """32-bit words in one token mask."""
        return (self.size + 31) // 32

    @classmethod
    def from_llamacpp(cls, vocab: Any, stop_ids: Iterable[int]) -> GrammarVocabulary:
        """From a llama.cpp vocabulary (`llama_model_get_vocab`): its pieces as bytes, control
        tokens marked special (never inside JSON text), llama.cpp's own tokenizer."""
        import llguidance.llamacpp

        stops = sorted(set(stop_ids))
        with warnings.catch_warnings():
            # It reads each token's attributes with llama-cpp-python's deprecated alias (one
            # DeprecationWarning per token).
            warnings.simplefilter("ignore", DeprecationWarning)
            tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(vocab, eos_token=stops)
        return cls(tokenizer, stops)

    @classmethod
    def from_llamacpp_model(cls, model: Any, stop_ids: Iterable[int]) -> GrammarVocabulary:
        """From a loaded llama.cpp model handle (`llama_model_load_from_file`)."""
        import llama_cpp

        return cls.from_llamacpp(llama_cpp.llama_model_get_vocab(model), stop_ids)

    @classmethod
    def from_tokenizer_json(
        cls, path: Path, stop_ids: Iterable[int], n_vocab: int | None = None
    ) -> GrammarVocabulary:
        """From a Hugging Face `tokenizer.json` (an exllamav2 model directory has one)."""
        stops = sorted(set(stop_ids))
        tokenizer = llguidance.LLTokenizer(
            path.read_text(encoding="utf-8"), n_vocab=n_vocab, eos_token=stops
        )
        return cls(tokenizer, stops)

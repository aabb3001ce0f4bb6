"""One sequence's place in its grammar: which tokens may come next, and whether the output
is complete."""

from __future__ import annotations

import llguidance
import numpy as np
import numpy.typing as npt

from consumer.engine.grammar.errors import GrammarFailed
from consumer.engine.grammar.vocabulary import GrammarVocabulary

TokenMask = npt.NDArray[np.int32]
"""One bit per token id (bit i of word i // 32), set where the token is allowed."""


class SequenceMatcher:
    """The grammar state of one generating sequence (lives in its sampler; survives a
    preemption with it). Not thread-safe: one sequence, one thread at a time."""

    def __init__(self, matcher: llguidance.LLMatcher, vocabulary: GrammarVocabulary) -> None:
        self._matcher = matcher
        self.vocabulary = vocabulary
        self.tokens = 0  # accepted so far

    @property
    def complete(self) -> bool:
        """The output is a whole JSON value and nothing may follow it but a stop token:
        generation ends here (no need to sample the stop token)."""
        return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        """The output so far is a whole JSON value (more may still follow, e.g. digits)."""
        return bool(self._matcher.is_accepting())

    def mask(self, out: TokenMask | None = None) -> TokenMask:
        """The allowed next tokens, written into `out` (a row of `mask_words` int32) if given."""
        if out is None:
            out = np.empty(self.vocabulary.mask_words, dtype=np.int32)
        self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        self._check()
        return out

    def advance(self, token: int) -> None:
        """Take the sampled `token` (one the mask allowed; a stop token ends the output)."""
        if not self._matcher.consume_token(token):
            self._check()
            raise GrammarFailed(f"token {token} is not allowed by the grammar")
        self.tokens += 1

    def _check(self) -> None:
        if self._matcher.is_error():
            # llguidance's message names its limit, never the generated text.
            reason = self._matcher.get_error().strip().splitlines()
            raise GrammarFailed(
                f"constrained decoding failed after {self.tokens} tokens: "
                f"{reason[0][:200] if reason else 'unknown error'}"
            )

"""One sequence's place in its grammar: which tokens may come next, and whether the output
is complete."""

from __future__ import annotations

import logging

import llguidance
import numpy as np
import numpy.typing as npt

from consumer.engine.grammar.vocabulary import GrammarVocabulary

log = logging.getLogger(__name__)

TokenMask = npt.NDArray[np.int32]
"""One bit per token id (bit i of word i // 32), set where the token is allowed."""


class SequenceMatcher:
    """The grammar state of one generating sequence (lives in its sampler; survives a
    preemption with it). Not thread-safe: one sequence, one thread at a time.

    A matcher that fails (a per-step limit of the grammar engine, or a token it did not allow)
    never raises into the batch it runs in: it is `failed`, allows only stop tokens and counts
    as `complete`, so its sequence ends at once and only that request sees an incomplete
    output.
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocabulary: GrammarVocabulary) -> None:
        self._matcher = matcher
        self.vocabulary = vocabulary
        self.tokens = 0  # accepted so far
        self.failed = False

    @property
    def complete(self) -> bool:
        """Nothing but a stop token may follow (the JSON is whole, or the matcher failed):
        generation ends here, without sampling the stop token."""
        return self.failed or bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        """The output so far is a whole JSON value (more may still follow, e.g. digits)."""
        return not self.failed and bool(self._matcher.is_accepting())

    def mask(self, out: TokenMask | None = None) -> TokenMask:
        """The allowed next tokens, written into `out` (a row of `mask_words` int32) if given."""
        if out is None:
            out = np.empty(self.vocabulary.mask_words, dtype=np.int32)
        if not self.failed:
            self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
            self._note_error()
        if self.failed:
            words = out.view(np.uint32)
            words[:] = 0
            for token in self.vocabulary.stop_ids:
                words[token // 32] |= np.uint32(1 << (token % 32))
        return out

    def advance(self, token: int) -> None:
        """Take the sampled `token` (one the mask allowed; a stop token ends the output)."""
        if self.failed:
            return
        if self._matcher.consume_token(token):
            self.tokens += 1
        else:
            self._note_error(f"token {token} is not allowed")

    def _note_error(self, reason: str | None = None) -> None:
        if reason is None and not self._matcher.is_error():
            return
        if reason is None:
            # llguidance's message names its limit, never the generated text.
            lines = self._matcher.get_error().strip().splitlines()
            reason = lines[0][:200] if lines else "unknown error"
        self.failed = True
        log.warning("grammar_failed", extra={"tokens": self.tokens, "reason": reason})

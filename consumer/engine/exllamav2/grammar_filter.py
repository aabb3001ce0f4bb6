"""A sequence's grammar as an exllamav2 sampling filter, for the paged dynamic generator (its
sampler calls filters; the static path masks rows itself, `sampling.sample_rows`).

Duck-typed to `exllamav2.generator.filters.ExLlamaV2Filter` (0.3.x): with `can_mask_logits`,
the sampler asks `get_next(mask=True)` (here: the mask, computed from the matcher) and then
`mask_logits` for the job's one row; `feed` gets each sampled token. Once the JSON is
complete only stop tokens are allowed, so the job ends at its next token.
"""

from __future__ import annotations

from typing import Any

from consumer.engine.grammar import SequenceMatcher, TokenMask, mask_torch_rows


class GrammarFilter:
    """One paged job's constraint (the same masks as every other engine path)."""

    allow_return_type_list = True

    def __init__(self, matcher: SequenceMatcher) -> None:
        self.matcher = matcher
        self.background_result = None
        self._mask: TokenMask | None = None

    # exllamav2's filter protocol

    def begin(self, prefix_str: str) -> None:
        """Start of generation; the matcher is fresh already."""

    def feed(self, token: Any) -> None:
        token_id = int(token.item()) if hasattr(token, "item") else int(token)
        if token_id not in self.matcher.vocabulary.stop_ids:
            self.matcher.advance(token_id)
        self._mask = None

    def can_mask_logits(self) -> bool:
        return True

    def use_background_worker(self) -> bool:
        return False

    def prepare_logit_mask(self) -> bool:
        self._mask = self.matcher.mask()
        return True

    def get_next(self, mask: bool = False) -> Any:
        return self.prepare_logit_mask()

    def mask_logits(self, logits: Any) -> Any:
        """`logits` (one row, the head's width) with the forbidden tokens at -inf."""
        mask = self._mask if self._mask is not None else self.matcher.mask()
        return mask_torch_rows(logits.view(1, -1), [(0, mask)]).view(-1)

    def background_drop(self) -> None:
        self.background_result = None

    def clone(self, c: Any = None) -> GrammarFilter:
        raise NotImplementedError("a grammar filter belongs to one job")

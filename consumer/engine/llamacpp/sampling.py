"""Choosing the next token from a row of logits, and scoring a known one. Pure numpy.

Temperature 0 (or below) is greedy: the argmax. Otherwise the logits are divided by the
temperature, softmaxed, cut to the smallest set of most likely tokens whose probability reaches
`top_p` (nucleus sampling), and one is drawn with the request's own seeded
`numpy.random.Generator`, so the same seed gives the same reply whatever else runs beside it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from consumer.engine.grammar import SequenceMatcher, mask_numpy

Logits = npt.NDArray[np.floating]


def greedy(logits: Logits) -> int:
    """The most likely token (the lowest id among equals)."""
    return int(np.argmax(logits))


def nucleus(logits: Logits, *, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token drawn from softmax(logits / temperature) cut to its top-`top_p` mass."""
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p >= 1.0:
        order = None
        kept = probs
    else:
        order = np.argsort(-probs, kind="stable")
        ranked = probs[order]
        # Keep tokens until their mass reaches top_p, the one that crosses it included (and
        # always at least the most likely one).
        keep = int(np.searchsorted(np.cumsum(ranked), top_p, side="left")) + 1
        kept = ranked[: min(keep, ranked.size)]
    cumulative = np.cumsum(kept)
    draw = rng.random() * cumulative[-1]
    index = min(int(np.searchsorted(cumulative, draw, side="right")), kept.size - 1)
    return int(order[index]) if order is not None else index


class Sampler:
    """The sampling settings of one request, with its random state and, for JSON output, its
    grammar state (both survive a preemption).

    With a `grammar`, every token the grammar forbids is masked out before choosing (greedy or
    nucleus alike) and the chosen one advances it; `complete` says the JSON is whole.
    """

    def __init__(
        self,
        *,
        temperature: float,
        top_p: float,
        seed: int,
        grammar: SequenceMatcher | None = None,
    ) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.rng = np.random.default_rng(seed)
        self.grammar = grammar

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def complete(self) -> bool:
        """The grammar's output is complete: nothing but the end may follow."""
        return self.grammar is not None and self.grammar.complete

    def __call__(self, logits: Logits) -> int:
        if self.grammar is not None:
            logits = mask_numpy(logits, self.grammar.mask())
        if self.is_greedy:
            token = greedy(logits)
        else:
            token = nucleus(logits, temperature=self.temperature, top_p=self.top_p, rng=self.rng)
        if self.grammar is not None:
            self.grammar.advance(token)
        return token


def derive_seed(base: int, counter: int) -> int:
    """A request's seed when it brought none: from the backend's seed and the request's number."""
    return int(np.random.SeedSequence([base & 0xFFFFFFFF, counter]).generate_state(1)[0])


def token_logprob(logits: Logits, token: int) -> float:
    """log softmax(logits)[token], in float64."""
    shifted = logits.astype(np.float64) - float(np.max(logits))
    return float(shifted[token]) - float(np.log(np.exp(shifted).sum()))

"""Per-row sampling for static batches (each request keeps its own temperature, top_p and seed).

Imports torch; only the backend imports this module, after the GPU is known to exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from consumer.engine.grammar import SequenceMatcher, mask_torch_rows


@dataclass(slots=True)
class RowSampling:
    """One row's sampling settings; temperature <= 0 means greedy.

    A seeded row gets its own RNG, created on the device the logits live on (the last GPU
    of a split model), so its draws do not depend on the other rows in the batch.
    """

    temperature: float
    top_p: float
    seed: int | None = None
    # JSON output: the row's tokens are masked by its grammar (consumer.engine.grammar).
    grammar: SequenceMatcher | None = None
    _generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability mass reaches top_p."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """`logits` with every id at or past the tokenizer's vocabulary set to -inf.

    A model's head can be wider than its tokenizer (Qwen2.5: 152,064 rows, 151,665 tokens);
    those rows are untrained and no text decodes from them. exllamav2's own sampler masks
    them the same way (`logits[:, :, vocab_size:] = -inf`).
    """
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    masked = logits.clone()
    masked[..., vocab_size:] = float("-inf")
    return masked


def sample_rows(
    logits: torch.Tensor, rows: Sequence[RowSampling], vocab_size: int | None = None
) -> list[int]:
    """Next token for each row of `logits` (batch x head width, float32), never an id at or
    past `vocab_size`, nor one a row's grammar forbids."""
    logits = mask_padded_vocab(logits, vocab_size)
    constrained = [
        (index, row.grammar.mask())
        for index, row in enumerate(rows)
        if row.grammar is not None and not row.grammar.complete
    ]
    logits = mask_torch_rows(logits, constrained)
    greedy = logits.argmax(dim=-1).tolist()
    chosen: list[int] = []
    for index, row in enumerate(rows):
        if row.temperature <= 0.0:
            chosen.append(int(greedy[index]))
            continue
        probs = torch.softmax(logits[index] / row.temperature, dim=-1)
        probs = top_p_filter(probs, row.top_p)
        token = torch.multinomial(probs, num_samples=1, generator=row.generator(logits.device))
        chosen.append(int(token.item()))
    return chosen

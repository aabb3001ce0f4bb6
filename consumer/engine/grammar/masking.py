"""Applying token masks to logits: a numpy row (llama.cpp) or rows of a torch batch
(exllamav2's padded batches and its paged jobs). A masked token gets -inf: greedy and
sampled decoding never choose it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from consumer.engine.grammar.matcher import TokenMask

if TYPE_CHECKING:
    import torch


def allowed_tokens(mask: TokenMask, width: int) -> npt.NDArray[np.bool_]:
    """The mask as one bool per id, `width` long (ids past the mask's vocabulary: False)."""
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little").astype(np.bool_)
    if bits.size >= width:
        return bits[:width]
    return np.concatenate([bits, np.zeros(width - bits.size, dtype=np.bool_)])


def mask_numpy(logits: npt.NDArray[np.floating], mask: TokenMask) -> npt.NDArray[np.floating]:
    """A copy of one row of `logits` with every token the mask forbids at -inf."""
    return np.where(allowed_tokens(mask, logits.shape[-1]), logits, -np.inf)


def mask_torch_rows(logits: torch.Tensor, masks: Sequence[tuple[int, TokenMask]]) -> torch.Tensor:
    """`logits` (batch x width) with row i's forbidden tokens at -inf for each (i, mask);
    other rows unchanged (a new tensor when any row is masked).

    The bits are unpacked on the CPU (numpy, ~40 us a row) and one bool matrix is copied to
    the logits' device (~150 KB a row for a 150k vocabulary, microseconds over PCIe); one
    `masked_fill` applies it to every row.
    """
    import torch

    if not masks:
        return logits
    rows, width = logits.shape
    forbidden = np.zeros((rows, width), dtype=np.bool_)
    for row, mask in masks:
        forbidden[row] = ~allowed_tokens(mask, width)
    on_device = torch.from_numpy(forbidden).to(logits.device, non_blocking=True)
    return logits.masked_fill(on_device, float("-inf"))

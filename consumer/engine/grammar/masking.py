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


def _bits(mask: TokenMask, width: int) -> npt.NDArray[np.uint8]:
    """The mask as one 0/1 byte per id, `width` long (ids past the mask's vocabulary: 0)."""
    count = min(width, mask.size * 32)
    bits = np.unpackbits(mask.view(np.uint8), count=count, bitorder="little")
    if count == width:
        return bits
    return np.concatenate([bits, np.zeros(width - count, dtype=np.uint8)])


def allowed_tokens(mask: TokenMask, width: int) -> npt.NDArray[np.bool_]:
    """The mask as one bool per id, `width` long (ids past the mask's vocabulary: False)."""
    return _bits(mask, width).view(np.bool_)


# Added to a logit by its token's bit: a branch-free select, ~3x faster than np.where on a
# mask that mixes allowed and forbidden ids (measured, 49k ids: 64 us against 172 us).
_PENALTY = np.array([-np.inf, 0.0], dtype=np.float32)


def mask_numpy(logits: npt.NDArray[np.floating], mask: TokenMask) -> npt.NDArray[np.floating]:
    """A copy of one row of `logits` with every token the mask forbids at -inf."""
    penalty = _PENALTY.take(_bits(mask, logits.shape[-1]))
    return logits + penalty


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

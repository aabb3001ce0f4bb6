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


_BIT_SHIFTS: dict[str, torch.Tensor] = {}


def mask_torch_rows(logits: torch.Tensor, masks: Sequence[tuple[int, TokenMask]]) -> torch.Tensor:
    """`logits` (batch x width) with row i's forbidden tokens at -inf for each (i, mask);
    other rows untouched. The packed masks go to the logits' device (32x smaller than a bool
    row) and are unpacked there."""
    import torch

    if not masks:
        return logits
    rows = [index for index, _ in masks]
    packed = torch.from_numpy(np.stack([m for _, m in masks])).to(logits.device)
    key = str(logits.device)
    shifts = _BIT_SHIFTS.get(key)
    if shifts is None:
        shifts = _BIT_SHIFTS[key] = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = ((packed.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1).bool()
    width = logits.shape[-1]
    if bits.shape[-1] >= width:
        bits = bits[:, :width]
    else:
        pad = torch.zeros(len(rows), width - bits.shape[-1], dtype=torch.bool, device=bits.device)
        bits = torch.cat([bits, pad], dim=-1)
    masked = logits.clone()
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    masked[index] = logits[index].masked_fill(~bits, float("-inf"))
    return masked

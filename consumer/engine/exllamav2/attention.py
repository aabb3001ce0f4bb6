"""Masked attention for static batches: torch SDPA over grouped KV heads, inside exllamav2.

exllamav2 0.3.2 runs masked (padded) batches through `ExLlamaV2Attention._attn_torch`, whose
SDPA branch drops the mask for plain text (`get_block_diag_mask` returns None: bidirectional
attention) and whose matmul branch honours it but copies K/V once per query head, for every
layer and every decode step. `grouped_attention` folds the query heads that share a KV head
into the query axis instead, so SDPA (its memory-efficient kernel runs on sm_75) reads each
K/V once, under exllamav2's own causal + padding mask. A model opts in through its config
(`use_grouped_attention`), so other models in the process keep exllamav2's code.

Imports torch; only the loader imports it, on the scheduler's thread (which owns the GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# Attribute set on an ExLlamaV2Config whose static batches use grouped SDPA.
CONFIG_FLAG = "opstream_grouped_sdpa"
_PATCH_MARK = "_opstream_grouped_sdpa"

AttnTorch = Callable[..., torch.Tensor]


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of q (batch, q_len, heads, dim) over k, v (batch, kv_len, kv_heads, dim).

    Query head h reads KV head h // (heads // kv_heads), as exllamav2's `repeat_kv` pairs them.
    `mask` is an additive bias of shape (batch, 1, q_len, kv_len), or None where nothing is
    hidden (one query over its whole past). Returns (batch, q_len, heads * dim), contiguous.
    """
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    # Row r * q_len + i of KV head g holds query i of head g * group + r.
    folded = (
        q.view(batch, q_len, kv_heads, group, dim)
        .permute(0, 2, 3, 1, 4)
        .reshape(batch, kv_heads, group * q_len, dim)
    )
    bias = None
    if mask is not None:
        # Every head of a group sees the same mask rows; a view when q_len == 1 (decoding).
        bias = (
            mask.expand(batch, 1, q_len, kv_len)
            .unsqueeze(2)
            .expand(batch, 1, group, q_len, kv_len)
            .reshape(batch, 1, group * q_len, kv_len)
        )
    out = F.scaled_dot_product_attention(
        folded, k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=scale
    )
    return (
        out.view(batch, kv_heads, group, q_len, dim)
        .permute(0, 3, 1, 2, 4)
        .reshape(batch, q_len, heads * dim)
        .contiguous()
    )


def grouped_attn_torch(original: AttnTorch) -> AttnTorch:
    """A replacement for `ExLlamaV2Attention._attn_torch` (0.3.2 signature) that runs
    `grouped_attention` for opted-in models and hands every other case to `original`."""

    def _attn_torch(
        self: Any,
        batch_size: int,
        q_len: int,
        q_states: torch.Tensor,
        k_states: torch.Tensor,
        v_states: torch.Tensor,
        attn_params: Any,
        cfg: Any,
        causal: bool = True,
    ) -> torch.Tensor:
        heads, kv_heads = q_states.shape[2], k_states.shape[2]
        plain = (
            getattr(cfg, CONFIG_FLAG, False)
            and causal
            and heads % kv_heads == 0
            and not self.sliding_window
            and not cfg.attn_logit_softcapping
            and not getattr(attn_params, "multi_cache", False)
            and self.layer_idx not in attn_params.block_diag_layers
        )
        if not plain:
            return original(
                self, batch_size, q_len, q_states, k_states, v_states, attn_params, cfg, causal
            )
        # exllamav2's own mask: causal (lower right) plus the input mask; None only for one
        # query without an input mask, where nothing is hidden.
        mask = attn_params.get_attn_mask(q_states.device)
        if mask is None and q_len > 1:
            return original(
                self, batch_size, q_len, q_states, k_states, v_states, attn_params, cfg, causal
            )
        return grouped_attention(q_states, k_states, v_states, mask, self.scaling)

    setattr(_attn_torch, _PATCH_MARK, True)
    return _attn_torch


def use_grouped_attention(config: Any) -> None:
    """Make exllamav2 run this model's masked attention through `grouped_attention`."""
    from exllamav2.attn import ExLlamaV2Attention

    current = ExLlamaV2Attention._attn_torch
    if not getattr(current, _PATCH_MARK, False):
        ExLlamaV2Attention._attn_torch = grouped_attn_torch(current)
    setattr(config, CONFIG_FLAG, True)

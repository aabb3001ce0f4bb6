"""Estimate the VRAM an EXL2 model needs (weights + KV cache + batch buffers) before loading it.

The terms follow exllamav2 0.3.x's own allocations: quantized weights on the GPU with the
embedding table in system RAM; K/V per token per layer at the cache's precision plus, for
quantized caches, one layer of FP16 K/V as working space; a scratch arena sized by the largest
module (usually the LM head's dequantization buffer); and the activations of one prefill chunk.
`decode_step_bytes` models the memory traffic of one decode step the same way, since decoding
is bound by memory bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from consumer.engine.exllamav2.errors import EngineConfigError
from consumer.engine.exllamav2.limits import plan_problems
from consumer.engine.exllamav2.modes import BatchingMode
from consumer.settings.exllamav2 import PAGE_TOKENS, CacheMode, StaticAttention

GIB = 1024**3
MIB = 1024**2

# Bytes per cached K or V element: packed values plus one FP16 scale per 32 elements.
CACHE_BYTES_PER_ELEMENT: dict[CacheMode, float] = {
    "fp16": 2.0,
    "q8": 1.0 + 2 / 32,
    "q6": (1.0 + 0.5) / 2 + 2 / 32,  # keys at 8 bits, values at 4 (exllamav2's Q6 layout)
    "q4": 0.5 + 2 / 32,
}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that decide its memory use."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """Read a HF config.json (as exllamav2 does for Llama/Qwen2-style models)."""
        text = config.get("text_config")
        cfg: Mapping[str, Any] = text if isinstance(text, Mapping) else config
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return cls(
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
        )

    @property
    def kv_elements_per_token(self) -> int:
        """K and V elements one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def body_params(self) -> int:
        """Parameters of the quantized linear layers in the decoder blocks (norms ignored)."""
        attn = self.hidden_size * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        attn += self.num_heads * self.head_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * (attn + mlp)


def weights_bytes_for_bpw(shape: ModelShape, bits_per_weight: float, head_bits: int = 6) -> int:
    """GPU bytes of an EXL2 quant at `bits_per_weight` (decoder) and `head_bits` (LM head)."""
    body = shape.body_params * bits_per_weight / 8
    head = shape.embedding_params * head_bits / 8
    return int(body + head)


def weights_bytes_on_gpu(safetensors_bytes: int, shape: ModelShape) -> int:
    """Bytes of a quantized checkpoint that land on the GPU: all but the FP16 embedding table."""
    return max(safetensors_bytes - 2 * shape.embedding_params, 0)


def cache_bytes(shape: ModelShape, tokens: int, mode: CacheMode) -> int:
    """One exllamav2 cache of `tokens` positions (batch x length), FP16 workspace included."""
    stored = tokens * shape.kv_elements_per_token * CACHE_BYTES_PER_ELEMENT[mode]
    workspace = 0 if mode == "fp16" else 2 * tokens * shape.num_kv_heads * shape.head_dim * 2
    return int(stored + workspace)


@dataclass(frozen=True, slots=True)
class VramPlan:
    """Everything the estimate depends on; built from settings and the model directory."""

    shape: ModelShape
    weights_bytes: int
    mode: BatchingMode
    cache_mode: CacheMode
    max_seq_len: int
    max_batch_size: int
    paged_cache_tokens: int
    prefill_chunk_tokens: int
    score_batch_size: int
    score_max_seq_len: int
    attention_budget_bytes: int
    max_dq_elements: int
    static_attention: StaticAttention = "sdpa"

    @property
    def generation_cache_tokens(self) -> int:
        """Static mode keeps a full-length row per batch slot; paged mode shares one pool."""
        if self.mode == "static":
            return self.max_batch_size * self.max_seq_len
        return self.paged_cache_tokens


@dataclass(frozen=True, slots=True)
class VramEstimate:
    """Bytes by purpose; `total` is what must fit on the card(s)."""

    weights: int
    generation_cache: int
    scoring_cache: int
    scratch: int
    activations: int

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.generation_cache
            + self.scoring_cache
            + self.scratch
            + self.activations
        )

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _scratch_bytes(plan: VramPlan) -> int:
    """exllamav2's per-device scratch arena: the largest module's fixed buffers."""
    s = plan.shape
    rows = plan.prefill_chunk_tokens
    widest = max(s.hidden_size, s.intermediate_size)
    mlp_dq = 2 * min(s.hidden_size * s.intermediate_size, plan.max_dq_elements)
    mlp = rows * s.hidden_size * 2 + 2 * rows * widest * 2 + mlp_dq
    attn_dq = 2 * min(s.hidden_size * s.num_heads * s.head_dim, plan.max_dq_elements)
    attn = rows * max(s.num_heads * s.head_dim, s.hidden_size) * 2 + attn_dq
    head = 2 * min(s.hidden_size * s.vocab_size, plan.max_dq_elements)
    return max(mlp, attn, head)


def _activation_bytes(plan: VramPlan) -> int:
    """Transient tensors of the largest forward pass: logits, and attention in static mode."""
    s = plan.shape
    # autosplit loading pushes one full chunk through the head; scoring returns a few rows each.
    per_forward_rows = plan.prefill_chunk_tokens // (
        plan.max_batch_size if plan.mode == "static" else 1
    )
    logit_rows = max(per_forward_rows, plan.score_batch_size * 16)
    logits = logit_rows * s.vocab_size * 2
    if plan.mode == "paged":
        return logits
    # Masked attention runs in torch, its score matrix (or SDPA's mask) bounded by
    # attention_budget. exllamav2's matmul path also expands the batch's K/V to every query
    # head in FP16; the grouped SDPA path reads them in place.
    if plan.static_attention == "sdpa":
        return logits + plan.attention_budget_bytes
    expanded_kv = 2 * plan.max_batch_size * plan.max_seq_len * s.num_heads * s.head_dim * 2
    return logits + expanded_kv + plan.attention_budget_bytes


def estimate_vram(plan: VramPlan) -> VramEstimate:
    """Bytes the engine will allocate on the GPU(s) with this plan."""
    return VramEstimate(
        weights=plan.weights_bytes,
        generation_cache=cache_bytes(plan.shape, plan.generation_cache_tokens, plan.cache_mode),
        scoring_cache=cache_bytes(
            plan.shape, plan.score_batch_size * plan.score_max_seq_len, plan.cache_mode
        ),
        scratch=_scratch_bytes(plan),
        activations=_activation_bytes(plan),
    )


def attention_bytes_per_cached_token(
    shape: ModelShape, cache_mode: CacheMode, *, repeats_kv: bool
) -> int:
    """Bytes one decode step moves per cached token of one sequence, summed over all layers.

    exllamav2 0.3.2, per layer and step: a quantized cache is dequantized whole into the FP16
    workspace (`get_kv_state(layer, batch, 0, past_len)`: read packed K/V, write FP16); then
    flash-attn or SDPA over grouped heads read the FP16 K/V once, while the matmul path's
    `repeat_kv` reads them, writes a copy per query head and the matmuls read that copy.
    """
    kv = shape.num_kv_heads * shape.head_dim  # K (or V) elements per token and layer
    q = shape.num_heads * shape.head_dim
    fp16_kv = 2 * kv * 2
    dequantize = 0.0 if cache_mode == "fp16" else 2 * kv * CACHE_BYTES_PER_ELEMENT[cache_mode]
    dequantize += 0 if cache_mode == "fp16" else fp16_kv
    if repeats_kv:
        attention = 2 * (kv * 2 + 2 * q * 2)  # K and V: read, write repeated, read repeated
    else:
        attention = fp16_kv
    return int(shape.num_layers * (dequantize + attention))


@dataclass(frozen=True, slots=True)
class DecodeTraffic:
    """Bytes one decode step reads and writes in GPU memory, which bounds its time."""

    weights: int
    attention: int

    @property
    def total(self) -> int:
        return self.weights + self.attention

    def tokens_per_second(self, rows: int, bandwidth_bytes_per_s: float) -> float:
        """Upper bound on decoded tokens/s for `rows` sequences at this memory bandwidth."""
        return rows * bandwidth_bytes_per_s / self.total


def decode_step_bytes(plan: VramPlan, rows: int, context_tokens: int) -> DecodeTraffic:
    """Traffic of one decode step of `rows` sequences with `context_tokens` cached each.

    A static batch's rows are all as long as its longest (left padding); paged sequences
    are each their own length, so pass their mean there.
    """
    repeats_kv = plan.mode == "static" and plan.static_attention == "matmul"
    per_token = attention_bytes_per_cached_token(plan.shape, plan.cache_mode, repeats_kv=repeats_kv)
    return DecodeTraffic(weights=plan.weights_bytes, attention=rows * context_tokens * per_token)


def _largest_fitting(lo: int, hi: int, fits: Any) -> int | None:
    """Largest n in [lo, hi] with fits(n) true, assuming fits is monotone decreasing."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def with_max_seq_len(plan: VramPlan, max_seq_len: int) -> tuple[VramPlan, str]:
    """`plan` at a shorter max_seq_len, with the lengths that must not exceed it lowered too,
    and the words that say so (" and score_max_seq_len to N ...")."""
    changed = replace(
        plan,
        max_seq_len=max_seq_len,
        paged_cache_tokens=_pool(plan, max_seq_len=max_seq_len),
        score_max_seq_len=min(plan.score_max_seq_len, max_seq_len),
        prefill_chunk_tokens=min(
            plan.prefill_chunk_tokens, max(max_seq_len // PAGE_TOKENS, 1) * PAGE_TOKENS
        ),
    )
    also = ""
    if changed.score_max_seq_len != plan.score_max_seq_len:
        also += f" and score_max_seq_len to {changed.score_max_seq_len}"
    if changed.prefill_chunk_tokens != plan.prefill_chunk_tokens:
        also += f" and prefill_chunk_tokens to {changed.prefill_chunk_tokens}"
    return changed, also


def suggested_plans(plan: VramPlan, available_bytes: int) -> list[tuple[str, VramPlan]]:
    """Each suggestion with the plan it leads to; every such plan fits and is safe to run."""

    def usable(p: VramPlan) -> bool:
        return estimate_vram(p).total <= available_bytes and not plan_problems(p)

    advice: list[tuple[str, VramPlan]] = []
    base, prefix = plan, ""
    if plan.cache_mode != "q4":
        q4 = replace(plan, cache_mode="q4")
        if usable(q4):
            advice.append((f"set cache_mode=q4 (now {plan.cache_mode})", q4))
        else:
            base, prefix = q4, "set cache_mode=q4 and "

    def with_batch(n: int) -> VramPlan:
        return replace(base, max_batch_size=n, paged_cache_tokens=_pool(base, max_batch_size=n))

    if base.max_batch_size > 1:
        best = _largest_fitting(1, base.max_batch_size - 1, lambda n: usable(with_batch(n)))
        if best is not None:
            advice.append(
                (
                    f"{prefix}lower max_batch_size to {best} (now {base.max_batch_size})",
                    with_batch(best),
                )
            )
    if base.max_seq_len > PAGE_TOKENS:
        steps = base.max_seq_len // PAGE_TOKENS
        best = _largest_fitting(
            1, steps - 1, lambda n: usable(with_max_seq_len(base, n * PAGE_TOKENS)[0])
        )
        if best is not None:
            shorter, also = with_max_seq_len(base, best * PAGE_TOKENS)
            advice.append(
                (
                    f"{prefix}lower max_seq_len to {shorter.max_seq_len} "
                    f"(now {base.max_seq_len}){also}",
                    shorter,
                )
            )
    short_scores = replace(plan, score_max_seq_len=min(1024, plan.max_seq_len))
    if plan.score_max_seq_len > 1024 and usable(short_scores):
        advice.append(
            (f"lower score_max_seq_len to 1024 (now {plan.score_max_seq_len})", short_scores)
        )
    small_dq = replace(plan, max_dq_elements=64 * MIB)
    if plan.max_dq_elements > 64 * MIB and usable(small_dq):
        advice.append((f"lower max_dq_elements to {64 * MIB}", small_dq))
    return advice


def suggest_changes(plan: VramPlan, available_bytes: int) -> list[str]:
    """Concrete settings that would make `plan` fit in `available_bytes`, best first."""
    advice = [text for text, _ in suggested_plans(plan, available_bytes)]
    minimal, _ = with_max_seq_len(
        replace(
            plan,
            cache_mode="q4",
            max_batch_size=1,
            score_batch_size=1,
            score_max_seq_len=min(plan.score_max_seq_len, 1024),
            max_dq_elements=64 * MIB,
            paged_cache_tokens=min(plan.paged_cache_tokens, 4096),
        ),
        min(plan.max_seq_len, 4096),
    )
    if estimate_vram(minimal).total > available_bytes:
        over = estimate_vram(minimal).total - available_bytes
        advice.append(
            f"use a smaller quant: the weights alone take {plan.weights_bytes / GIB:.2f} GiB; "
            f"even a minimal configuration is {over / GIB:.2f} GiB over"
        )
    return advice


def _pool(
    plan: VramPlan, *, max_batch_size: int | None = None, max_seq_len: int | None = None
) -> int:
    """The paged pool scaled like the default (max_seq_len x max_batch_size), never larger."""
    tokens = (max_batch_size or plan.max_batch_size) * (max_seq_len or plan.max_seq_len)
    tokens = max(tokens, max_seq_len or plan.max_seq_len)
    return min(plan.paged_cache_tokens, math.ceil(tokens / PAGE_TOKENS) * PAGE_TOKENS)


def check_fits(
    plan: VramPlan, available_bytes: int, *, device_names: str = "the GPU"
) -> VramEstimate:
    """The estimate if it fits in `available_bytes`; otherwise an error that says what to change."""
    estimate = estimate_vram(plan)
    if estimate.total <= available_bytes:
        return estimate
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in estimate.as_dict().items() if k != "total")
    advice = suggest_changes(plan, available_bytes)
    raise EngineConfigError(
        f"model will not fit on {device_names}: needs about {estimate.total / GIB:.2f} GiB "
        f"({parts} GiB), {available_bytes / GIB:.2f} GiB available "
        f"(mode={plan.mode}, cache_mode={plan.cache_mode}, max_seq_len={plan.max_seq_len}, "
        f"max_batch_size={plan.max_batch_size}). "
        + ("Try: " + "; or ".join(advice) if advice else "No setting change is enough.")
    )

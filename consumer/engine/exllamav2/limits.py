"""Setting combinations that exllamav2 0.3.2 would crash or hang on, refused before loading."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from consumer.engine.exllamav2.errors import EngineConfigError

if TYPE_CHECKING:
    from consumer.engine.exllamav2.vram import VramPlan

MIB = 1024**2
# ExLlamaV2DynamicGenerator's default max_q_size: tokens per sequence in one decode step.
PAGED_MAX_Q_SIZE = 8
# exllamav2's own default floor for max_attention_size is far larger; this is ours.
MIN_ATTENTION_SIZE = 128 * 128
# Bytes per (query, key) pair, per row and head, of static attention's working memory: FP16
# scores, their softmax and the masked sum (exllamav2's matmul path; torch's math SDPA kernel,
# the fallback when no fused kernel fits, needs as much).
ATTENTION_BYTES_PER_SCORE = 2 * 3


def static_max_attention_size(budget_bytes: int, max_batch_size: int, num_heads: int) -> int:
    """exllamav2's `config.max_attention_size` for static batches: query x key positions a
    forward chunk may cover, so the attention of a whole batch stays within `budget_bytes`."""
    per_pair = max_batch_size * num_heads * ATTENTION_BYTES_PER_SCORE
    return max(budget_bytes // per_pair, MIN_ATTENTION_SIZE)


def plan_problems(plan: VramPlan) -> list[str]:
    """What in `plan` would crash or hang exllamav2 0.3.2, each with the setting to change."""
    problems: list[str] = []
    if plan.score_max_seq_len > plan.max_seq_len:
        problems.append(
            f"score_max_seq_len {plan.score_max_seq_len} exceeds max_seq_len {plan.max_seq_len} "
            "(RoPE tables hold max_seq_len positions and the kernel does not check): "
            f"lower score_max_seq_len to {plan.max_seq_len}"
        )
    if plan.prefill_chunk_tokens > plan.max_seq_len:
        problems.append(
            f"prefill_chunk_tokens {plan.prefill_chunk_tokens} exceeds max_seq_len "
            f"{plan.max_seq_len} (the paged generator asserts on it): lower prefill_chunk_tokens"
        )
    if plan.mode == "static":
        size = static_max_attention_size(
            plan.attention_budget_bytes, plan.max_batch_size, plan.shape.num_heads
        )
        # model.forward shrinks a chunk to floor((sqrt(past^2 + 4 * size) - past) / 2) tokens,
        # which is 0 once past >= size: the decode step would loop forever without progress.
        if size < plan.max_seq_len:
            need = plan.max_seq_len * plan.max_batch_size * plan.shape.num_heads
            need_mb = math.ceil(need * ATTENTION_BYTES_PER_SCORE / MIB)
            problems.append(
                f"attention_budget_mb {plan.attention_budget_bytes // MIB} allows attention over "
                f"{size} positions per chunk, fewer than max_seq_len {plan.max_seq_len} (a decode "
                f"step near full context would never finish): raise attention_budget_mb to "
                f"{need_mb} or lower max_batch_size or max_seq_len"
            )
    elif PAGED_MAX_Q_SIZE * plan.max_batch_size > plan.prefill_chunk_tokens:
        problems.append(
            f"max_batch_size {plan.max_batch_size} x {PAGED_MAX_Q_SIZE} tokens per decode step "
            f"exceeds prefill_chunk_tokens {plan.prefill_chunk_tokens} (the paged generator's "
            f"buffers): raise prefill_chunk_tokens to "
            f"{math.ceil(PAGED_MAX_Q_SIZE * plan.max_batch_size / 256) * 256} "
            "or lower max_batch_size"
        )
    return problems


def check_plan(plan: VramPlan) -> None:
    """Raise EngineConfigError naming every unsafe combination in `plan`."""
    problems = plan_problems(plan)
    if problems:
        raise EngineConfigError("unsafe exllamav2 settings: " + "; ".join(problems))

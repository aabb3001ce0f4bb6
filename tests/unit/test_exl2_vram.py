"""The VRAM estimate refuses plans that will not fit and says which setting would."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.engine.exllamav2.errors import EngineConfigError
from consumer.engine.exllamav2.limits import check_plan, plan_problems, static_max_attention_size
from consumer.engine.exllamav2.vram import (
    GIB,
    MIB,
    ModelShape,
    VramPlan,
    attention_bytes_per_cached_token,
    cache_bytes,
    check_fits,
    decode_step_bytes,
    estimate_vram,
    suggest_changes,
    suggested_plans,
    weights_bytes_for_bpw,
    weights_bytes_on_gpu,
)

QWEN25_7B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
}
QWEN = ModelShape.from_config(QWEN25_7B_CONFIG)
# A T4 reports ~15.1 GiB free after the CUDA context; the engine keeps 512 MiB back.
T4_AVAILABLE = int(15.1 * GIB) - 512 * MIB


def plan(**overrides: object) -> VramPlan:
    base = VramPlan(
        shape=QWEN,
        weights_bytes=weights_bytes_for_bpw(QWEN, 4.5),
        mode="static",
        cache_mode="q4",
        max_seq_len=16384,
        max_batch_size=8,
        paged_cache_tokens=16384 * 8,
        prefill_chunk_tokens=2048,
        score_batch_size=8,
        score_max_seq_len=4096,
        attention_budget_bytes=1024 * MIB,
        max_dq_elements=512 * MIB,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def test_qwen25_7b_shape_matches_its_published_size() -> None:
    assert QWEN.head_dim == 128
    total = QWEN.body_params + 2 * QWEN.embedding_params
    assert 7.5e9 < total < 7.7e9  # Qwen2.5-7B has 7.61B parameters


def test_q4_cache_costs_under_16_kib_per_token_for_qwen25_7b() -> None:
    per_token = QWEN.kv_elements_per_token * (0.5 + 2 / 32)
    assert per_token == 16128
    assert cache_bytes(QWEN, 1000, "q4") > 1000 * per_token  # plus the FP16 workspace
    assert cache_bytes(QWEN, 1000, "fp16") == 1000 * QWEN.kv_elements_per_token * 2


def test_weights_on_gpu_exclude_the_fp16_embedding_table() -> None:
    on_disk = 5 * GIB
    assert weights_bytes_on_gpu(on_disk, QWEN) == on_disk - 2 * QWEN.embedding_params


def test_default_settings_fit_a_t4_with_a_45_bpw_quant() -> None:
    estimate = check_fits(plan(), T4_AVAILABLE)
    assert estimate.total < T4_AVAILABLE
    assert estimate.total == sum(v for k, v in estimate.as_dict().items() if k != "total")


def test_static_mode_needs_more_than_paged_for_the_same_batch() -> None:
    assert estimate_vram(plan(mode="static")).total > estimate_vram(plan(mode="paged")).total


def test_an_8bpw_quant_with_fp16_cache_and_batch_16_is_refused_with_advice() -> None:
    too_big = plan(
        weights_bytes=weights_bytes_for_bpw(QWEN, 8.0),
        cache_mode="fp16",
        max_batch_size=16,
        paged_cache_tokens=16384 * 16,
        static_attention="matmul",
    )
    with pytest.raises(EngineConfigError) as caught:
        check_fits(too_big, T4_AVAILABLE, device_names="Tesla T4")
    message = str(caught.value)
    assert "Tesla T4" in message
    assert "set cache_mode=q4 and lower max_batch_size" in message


def test_fp16_cache_alone_is_fixed_by_switching_to_q4() -> None:
    advice = suggest_changes(plan(cache_mode="fp16", max_batch_size=4), int(9.5 * GIB))
    assert advice[0] == "set cache_mode=q4 (now fp16)"
    assert estimate_vram(plan(cache_mode="q4", max_batch_size=4)).total <= 9.5 * GIB


def test_every_suggested_batch_size_actually_fits() -> None:
    too_big = plan(max_batch_size=32, paged_cache_tokens=16384 * 32)
    advice = suggest_changes(too_big, T4_AVAILABLE)
    batch = next(a for a in advice if a.startswith("lower max_batch_size"))
    n = int(re.findall(r"\d+", batch)[0])
    assert estimate_vram(replace(too_big, max_batch_size=n)).total <= T4_AVAILABLE
    assert estimate_vram(replace(too_big, max_batch_size=n + 1)).total > T4_AVAILABLE


def test_a_model_too_big_for_any_setting_says_to_use_a_smaller_quant() -> None:
    huge = plan(weights_bytes=20 * GIB)
    with pytest.raises(EngineConfigError, match="smaller quant"):
        check_fits(huge, T4_AVAILABLE)


def test_shape_reads_text_config_and_defaults_kv_heads() -> None:
    nested = {"text_config": {**QWEN25_7B_CONFIG, "num_key_value_heads": None}}
    shape = ModelShape.from_config(nested)
    assert shape.num_kv_heads == shape.num_heads == 28


# -- decode traffic (why static batches use grouped SDPA) --------------------------------

T4_BANDWIDTH = 320e9  # bytes/s, the T4's spec sheet


def test_decode_traffic_per_cached_token_for_qwen25_7b() -> None:
    # Q4 dequantized to FP16 every step: 28 x (1024 x 0.5625 read + 1024 x 2 written) bytes.
    assert attention_bytes_per_cached_token(QWEN, "q4", repeats_kv=False) == 130_816
    # exllamav2's matmul path adds repeat_kv: K and V copied to all 28 query heads and reread.
    assert attention_bytes_per_cached_token(QWEN, "q4", repeats_kv=True) == 933_632
    assert attention_bytes_per_cached_token(QWEN, "fp16", repeats_kv=False) == 57_344


def test_on_a_t4_matmul_attention_dwarfs_the_weights_at_batch_8_and_16k() -> None:
    matmul = decode_step_bytes(plan(static_attention="matmul"), rows=8, context_tokens=16384)
    grouped = decode_step_bytes(plan(static_attention="sdpa"), rows=8, context_tokens=16384)
    assert matmul.total / T4_BANDWIDTH > 0.38  # s per step: ~20 tokens/s for 8 sequences
    assert grouped.total / T4_BANDWIDTH < 0.07
    assert matmul.attention > 25 * matmul.weights
    assert grouped.tokens_per_second(8, T4_BANDWIDTH) > 5 * matmul.tokens_per_second(
        8, T4_BANDWIDTH
    )


def test_paged_decoding_reads_the_cache_like_grouped_sdpa() -> None:
    paged = decode_step_bytes(plan(mode="paged"), rows=4, context_tokens=1000)
    grouped = decode_step_bytes(plan(static_attention="sdpa"), rows=4, context_tokens=1000)
    assert paged == grouped


def test_grouped_sdpa_needs_no_expanded_kv_copy() -> None:
    expanded = 2 * 8 * 16384 * QWEN.num_heads * QWEN.head_dim * 2
    matmul = estimate_vram(plan(static_attention="matmul")).activations
    assert estimate_vram(plan(static_attention="sdpa")).activations == matmul - expanded


# -- settings exllamav2 would crash or hang on ------------------------------------------------


def exllamav2_chunk_size(past: int, remaining: int, max_attention_size: int) -> int:
    """The static chunk size from exllamav2 0.3.2 model.py `forward` (no flash-attn)."""
    chunk = remaining
    if (past + remaining) * remaining > max_attention_size:
        cs = (math.sqrt(past**2 + 4 * max_attention_size) - past) / 2
        chunk = min(chunk, math.floor(cs))
    return chunk


def test_an_attention_size_below_max_seq_len_stalls_exllamav2_and_is_refused() -> None:
    tight = plan(max_seq_len=65536, max_batch_size=64, attention_budget_bytes=64 * MIB)
    size = static_max_attention_size(64 * MIB, 64, QWEN.num_heads)
    assert size < 65536
    assert exllamav2_chunk_size(past=65535, remaining=1, max_attention_size=size) == 0
    with pytest.raises(EngineConfigError, match="raise attention_budget_mb to"):
        check_plan(tight)


def test_an_attention_size_of_max_seq_len_always_advances() -> None:
    size = 4096
    assert all(exllamav2_chunk_size(p, 1, size) >= 1 for p in range(size))


def test_the_default_plans_are_safe() -> None:
    assert plan_problems(plan()) == []
    assert plan_problems(plan(mode="paged")) == []


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"score_max_seq_len": 32768}, "score_max_seq_len"),
        ({"prefill_chunk_tokens": 32768}, "prefill_chunk_tokens"),
        ({"mode": "paged", "max_batch_size": 512}, "max_batch_size"),
    ],
)
def test_unsafe_combinations_are_named(overrides: dict[str, object], names: str) -> None:
    problems = plan_problems(plan(**overrides))
    assert len(problems) == 1 and names in problems[0]


@settings(max_examples=80, deadline=None)
@given(
    cache_mode=st.sampled_from(["fp16", "q8", "q6", "q4"]),
    mode=st.sampled_from(["static", "paged"]),
    attention=st.sampled_from(["sdpa", "matmul"]),
    batch=st.integers(1, 32),
    pages=st.integers(2, 256),
    score_pages=st.integers(1, 64),
    prefill_pages=st.integers(1, 16),
    available_gib=st.floats(4.5, 40.0),
)
def test_every_suggestion_leads_to_a_safe_plan_that_fits(
    cache_mode: str,
    mode: str,
    attention: str,
    batch: int,
    pages: int,
    score_pages: int,
    prefill_pages: int,
    available_gib: float,
) -> None:
    max_seq_len = pages * 256
    base = plan(
        cache_mode=cache_mode,
        mode=mode,
        static_attention=attention,
        max_batch_size=batch,
        max_seq_len=max_seq_len,
        paged_cache_tokens=max_seq_len * batch,
        score_max_seq_len=min(score_pages * 256, max_seq_len),
        prefill_chunk_tokens=max(min(prefill_pages * 256, max_seq_len), 8 * batch),
    )
    if plan_problems(base):
        return  # refused before any suggestion is made
    available = int(available_gib * GIB)
    for text, suggested in suggested_plans(base, available):
        assert plan_problems(suggested) == [], text
        assert estimate_vram(suggested).total <= available, text
        if suggested.score_max_seq_len != base.score_max_seq_len:
            assert "score_max_seq_len" in text
        if suggested.prefill_chunk_tokens != base.prefill_chunk_tokens:
            assert "prefill_chunk_tokens" in text


def test_a_shorter_context_also_shortens_the_scoring_context() -> None:
    too_long = plan(max_seq_len=131072, score_max_seq_len=4096, paged_cache_tokens=131072 * 8)
    advice = suggest_changes(too_long, T4_AVAILABLE)
    shorter = next(a for a in advice if "lower max_seq_len" in a)
    length = int(re.findall(r"lower max_seq_len to (\d+)", shorter)[0])
    if length < 4096:
        assert f"score_max_seq_len to {length}" in shorter

"""The VRAM estimate refuses plans that will not fit and says which setting would."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from consumer.engine.exllamav2.errors import EngineConfigError
from consumer.engine.exllamav2.vram import (
    GIB,
    MIB,
    ModelShape,
    VramPlan,
    cache_bytes,
    check_fits,
    estimate_vram,
    suggest_changes,
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

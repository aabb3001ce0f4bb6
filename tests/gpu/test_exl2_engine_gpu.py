"""The exllamav2 engine on a real GPU with a tiny random EXL2 Qwen2, in both batching modes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from consumer.engine.base import ChatMessage, Engine, EngineError, GenerationRequest
from consumer.engine.exllamav2 import EngineConfigError, ExLlamaV2Settings, load_exllamav2_engine

pytestmark = pytest.mark.gpu

PROMPTS = [
    "Summarize: the cat sat on the mat.",
    "Translate to French: good morning",
    "hi",
    "Write one sentence about the sea and the wind and the long grey rocks of the coast.",
    "Classify: I love it",
    "2+2?",
]


def flash_attn_paged_usable() -> bool:
    from consumer.engine.exllamav2.backend import flash_attn_version, probe_gpus
    from consumer.engine.exllamav2.modes import flash_attn_blocker

    return flash_attn_blocker(probe_gpus(), flash_attn_version()) is None


def settings_for(model_dir: Path, mode: str) -> ExLlamaV2Settings:
    return ExLlamaV2Settings(
        model_dir=model_dir,
        batching_mode=mode,  # type: ignore[arg-type]
        max_seq_len=2048,
        max_batch_size=4,
        cache_tokens=8192,
        prefill_chunk_tokens=512,
        score_batch_size=2,
        score_max_seq_len=512,
        attention_budget_mb=128,
        progress_bar=False,
    )


async def open_engine(model_dir: Path, mode: str) -> Any:
    return await asyncio.to_thread(load_exllamav2_engine, settings_for(model_dir, mode))


@pytest.fixture(scope="module")
async def static_engine(tiny_exl2_dir: Path) -> AsyncIterator[Any]:
    engine = await open_engine(tiny_exl2_dir, "static")
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
async def paged_engine(tiny_exl2_dir: Path) -> AsyncIterator[Any]:
    if not flash_attn_paged_usable():
        pytest.skip("paged mode needs flash-attn >= 2.5.7 on sm_80+")
    engine = await open_engine(tiny_exl2_dir, "paged")
    yield engine
    await engine.close()


def request(text: str, max_tokens: int = 24, **kw: Any) -> GenerationRequest:
    return GenerationRequest(messages=(ChatMessage("user", text),), max_tokens=max_tokens, **kw)


async def check_generates_and_batches(engine: Any) -> None:
    assert isinstance(engine, Engine)
    results = await asyncio.gather(*(engine.generate(request(p)) for p in PROMPTS))
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.finish_reason in ("stop", "length")
        assert 0 <= result.output_tokens <= 24
        if result.finish_reason == "length":
            assert result.output_tokens == 24
        assert result.input_tokens > engine.count_tokens(prompt)
        assert "<|im_end|>" not in result.text
    # Greedy decoding of the same request is repeatable.
    again = await engine.generate(request(PROMPTS[0]))
    assert again.text == results[0].text


async def test_static_mode_batches_concurrent_requests(static_engine: Any) -> None:
    info = static_engine.info
    assert info.loaded and info.details["batching_mode"] == "static"
    await check_generates_and_batches(static_engine)


async def test_paged_mode_batches_concurrent_requests(paged_engine: Any) -> None:
    assert paged_engine.info.details["batching_mode"] == "paged"
    await check_generates_and_batches(paged_engine)


async def test_info_reports_gpu_memory_and_mode(static_engine: Any) -> None:
    details = static_engine.info.details
    gpu = details["gpus"][0]
    assert 0 < gpu["memory_used_bytes"] <= gpu["memory_total_bytes"]
    assert gpu["name"]
    assert details["vram_estimate_bytes"]["total"] > 0


async def test_padded_static_batch_matches_each_prompt_alone(static_engine: Any) -> None:
    """Through real exllamav2 kernels: mask + position offsets make padding invisible."""
    import torch
    from exllamav2 import ExLlamaV2Cache

    from consumer.engine.exllamav2.batching import left_pad

    runtime = static_engine._worker.startup.runtime
    prompts = [static_engine._encode_prompt((ChatMessage("user", p),)) for p in PROMPTS[:3]]
    cache = ExLlamaV2Cache(runtime.model, batch_size=len(prompts), max_seq_len=256)
    padded = left_pad(prompts, runtime.pad_id)
    ids = torch.tensor(padded.ids)
    mask = torch.tensor(padded.attention_bias(), dtype=torch.float16)
    offsets = torch.tensor(padded.position_offsets, dtype=torch.int)

    def forward_batched() -> Any:
        return runtime.model.forward(ids, cache, input_mask=mask, position_offsets=offsets)

    def forward_alone(row: list[int]) -> Any:
        solo = ExLlamaV2Cache(runtime.model, batch_size=1, max_seq_len=256)
        return runtime.model.forward(torch.tensor([row]), solo)

    # The engine's worker is idle (no request in flight), so this thread may use the model.
    batched = (await asyncio.to_thread(forward_batched)).float()
    for i, row in enumerate(prompts):
        alone = (await asyncio.to_thread(forward_alone, row)).float()
        last_batched, last_alone = batched[i, -1], alone[0, -1]
        scale = float(last_alone.abs().max()) + 1e-3
        assert float((last_batched - last_alone).abs().max()) <= 0.02 * scale + 1e-3


async def test_scores_match_a_full_forward_pass(static_engine: Any) -> None:
    import torch

    messages = (ChatMessage("user", "Is this positive? I love it"),)
    labels = ("pos", "positive", "negative")
    scores = await static_engine.score(messages, labels)
    assert len(scores.logprobs) == 3 and all(lp < 0 for lp in scores.logprobs)

    runtime = static_engine._worker.startup.runtime
    prompt = static_engine._encode_prompt(messages)
    for label, got in zip(labels, scores.logprobs, strict=True):
        candidate = static_engine._encode_candidate(label)
        ids = torch.tensor([prompt + candidate])
        logits = (await asyncio.to_thread(runtime.model.forward, ids)).float()
        lp = torch.log_softmax(logits[0], dim=-1)
        targets = [*candidate, runtime.end_of_turn_id]
        want = sum(float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(targets))
        assert got == pytest.approx(want, abs=0.05)


async def test_paged_mode_scores_labels(paged_engine: Any) -> None:
    scores = await paged_engine.score((ChatMessage("user", "label it"),), ("a", "bb", "a b c"))
    assert len(scores.logprobs) == 3 and all(lp < 0 for lp in scores.logprobs)


async def test_too_long_request_is_refused_without_running(static_engine: Any) -> None:
    with pytest.raises(EngineError) as caught:
        await static_engine.generate(request("x", max_tokens=4096))
    assert caught.value.retryable is False


def test_a_plan_that_cannot_fit_is_refused_before_loading(tiny_exl2_dir: Path) -> None:
    huge = settings_for(tiny_exl2_dir, "static").model_copy(
        update={"max_seq_len": 131072, "max_batch_size": 256, "cache_mode": "fp16"}
    )
    with pytest.raises(EngineConfigError, match="Try:"):
        load_exllamav2_engine(huge)

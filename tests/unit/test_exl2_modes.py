"""Batching mode selection and the exllamav2 settings model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from consumer.engine.exllamav2 import ExLlamaV2Settings
from consumer.engine.exllamav2.errors import EngineConfigError
from consumer.engine.exllamav2.modes import GpuFacts, parse_version, select_batching_mode

T4 = GpuFacts(index=0, name="Tesla T4", capability=(7, 5), total_bytes=16 * 2**30, free_bytes=0)
A100 = GpuFacts(index=0, name="A100", capability=(8, 0), total_bytes=80 * 2**30, free_bytes=0)


def test_t4_with_flash_attn_installed_still_batches_statically() -> None:
    decision = select_batching_mode("auto", [T4], "2.6.3")
    assert decision.mode == "static"
    assert "sm_75" in decision.reason


def test_ampere_with_recent_flash_attn_pages() -> None:
    assert select_batching_mode("auto", [A100], "2.6.3").mode == "paged"


def test_ampere_without_flash_attn_batches_statically() -> None:
    decision = select_batching_mode("auto", [A100], None)
    assert decision.mode == "static"
    assert "not installed" in decision.reason


def test_flash_attn_older_than_257_has_no_paged_attention() -> None:
    assert select_batching_mode("auto", [A100], "2.5.6").mode == "static"
    assert select_batching_mode("auto", [A100], "2.5.7.post1").mode == "paged"


def test_the_weakest_gpu_decides_for_a_split_model() -> None:
    assert select_batching_mode("auto", [A100, T4], "2.6.3").mode == "static"


def test_forcing_paged_on_a_t4_fails_and_names_the_fix() -> None:
    with pytest.raises(EngineConfigError, match="BATCHING_MODE=static"):
        select_batching_mode("paged", [T4], "2.6.3")


def test_forcing_static_on_ampere_is_honoured() -> None:
    assert select_batching_mode("static", [A100], "2.6.3").mode == "static"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2.6.3", (2, 6, 3)), ("2.5.7.post1", (2, 5, 7)), ("2.7.0rc1", (2, 7, 0)), (None, None)],
)
def test_parse_version(text: str | None, expected: tuple[int, ...] | None) -> None:
    assert parse_version(text) == expected


def test_settings_defaults_match_the_t4_plan() -> None:
    settings = ExLlamaV2Settings()
    assert settings.max_seq_len == 16384
    assert settings.cache_mode == "q4"
    assert settings.batching_mode == "auto"
    assert settings.paged_cache_tokens == 16384 * settings.max_batch_size


def test_paged_pool_rounds_up_to_whole_pages() -> None:
    assert ExLlamaV2Settings(cache_tokens=20000, max_seq_len=16384).paged_cache_tokens == 20224


@pytest.mark.parametrize(
    "bad",
    [
        {"prefill_chunk_tokens": 1000},
        {"cache_tokens": 1024, "max_seq_len": 4096},
        {"batching_mode": "dynamic"},
        {"cache_mode": "q3"},
        {"unknown": 1},
    ],
)
def test_invalid_settings_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ExLlamaV2Settings(**bad)  # type: ignore[arg-type]


def test_settings_nest_under_engine_exllamav2_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from consumer.settings import Settings

    monkeypatch.setenv("OPSTREAM_ENGINE__EXLLAMAV2__MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("OPSTREAM_ENGINE__EXLLAMAV2__BATCHING_MODE", "static")
    monkeypatch.setenv("OPSTREAM_ENGINE__EXLLAMAV2__GPU_SPLIT", "[10.5, 14]")
    settings = Settings()
    assert isinstance(settings.engine.exllamav2, BaseModel)
    assert settings.engine.exllamav2.max_batch_size == 4
    assert settings.engine.exllamav2.batching_mode == "static"
    assert settings.engine.exllamav2.gpu_split == [10.5, 14.0]


def test_importing_the_engine_package_imports_neither_torch_nor_exllamav2() -> None:
    code = (
        "import sys, consumer.engine.exllamav2; "
        "bad = {'torch', 'exllamav2', 'flash_attn'} & set(sys.modules); "
        "print(sorted(bad), file=sys.stderr); sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=root
    )
    assert done.returncode == 0, done.stderr

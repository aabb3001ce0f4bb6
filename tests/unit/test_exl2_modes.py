"""Batching mode selection and the exllamav2 settings model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from consumer.engine.exllamav2.errors import EngineConfigError
from consumer.engine.exllamav2.modes import GpuFacts, parse_version, select_batching_mode
from consumer.settings.exllamav2 import ExLlamaV2Settings

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


def test_unset_lengths_follow_a_short_max_seq_len() -> None:
    settings = ExLlamaV2Settings(max_seq_len=1000)
    assert settings.score_max_seq_len == 1000
    assert settings.prefill_chunk_tokens == 768  # whole 256-token pages
    from_env_text = ExLlamaV2Settings.model_validate({"max_seq_len": "1024"})
    assert from_env_text.score_max_seq_len == 1024


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"max_seq_len": 2048, "score_max_seq_len": 4096}, "score_max_seq_len"),
        ({"max_seq_len": 1024, "prefill_chunk_tokens": 2048}, "prefill_chunk_tokens"),
    ],
)
def test_lengths_set_beyond_max_seq_len_are_refused(bad: dict[str, int], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        ExLlamaV2Settings(**bad)  # type: ignore[arg-type]


def test_a_flash_attn_that_fails_to_import_falls_back_to_static_and_says_why() -> None:
    problem = "fails to import (ImportError: undefined symbol: _ZN3c104cuda9SetDevice)"
    decision = select_batching_mode("auto", [A100], "2.7.4", problem)
    assert decision.mode == "static"
    assert "2.7.4" in decision.reason and "undefined symbol" in decision.reason
    with pytest.raises(EngineConfigError, match="fails to import"):
        select_batching_mode("paged", [A100], "2.7.4", problem)


def fake_flash_attn(root: Path, init: str) -> None:
    """A flash_attn package (and its CUDA module) on `root`, importing `init` as its body."""
    package = root / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(init)
    (root / "flash_attn_2_cuda.py").write_text("")


@pytest.fixture
def flash_attn_2_7_4(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    from consumer.engine.exllamav2 import probes

    monkeypatch.setattr(probes, "flash_attn_version", lambda: "2.7.4")
    monkeypatch.delenv("EXLLAMA_NO_FLASH_ATTN", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn_2_cuda"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def test_probe_reports_a_flash_attn_built_for_another_torch(flash_attn_2_7_4: Path) -> None:
    from consumer.engine.exllamav2.probes import probe_flash_attn

    # What a wheel built against another torch raises: ImportError, not ModuleNotFoundError,
    # which exllamav2 0.3.2's attn.py does not catch.
    fake_flash_attn(flash_attn_2_7_4, "raise ImportError('undefined symbol: _ZN3c10')\n")
    probe = probe_flash_attn()
    assert probe.version == "2.7.4"
    assert probe.problem is not None and "ImportError: undefined symbol" in probe.problem


def test_probe_accepts_a_flash_attn_that_imports(flash_attn_2_7_4: Path) -> None:
    from consumer.engine.exllamav2.probes import probe_flash_attn

    fake_flash_attn(flash_attn_2_7_4, "__version__ = '2.7.4'\n")
    assert probe_flash_attn().problem is None


def test_probe_honours_exllamav2s_own_switch(
    flash_attn_2_7_4: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consumer.engine.exllamav2.probes import probe_flash_attn

    fake_flash_attn(flash_attn_2_7_4, "__version__ = '2.7.4'\n")
    monkeypatch.setenv("EXLLAMA_NO_FLASH_ATTN", "1")
    probe = probe_flash_attn()
    assert probe.problem == "EXLLAMA_NO_FLASH_ATTN is set"
    assert select_batching_mode("auto", [A100], probe.version, probe.problem).mode == "static"

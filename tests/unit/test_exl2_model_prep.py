"""Preparing EXL2 models: the converter runs with causal attention, and the GPU tests find
exllamav2's calibration text in 0.3.2's layout (both without a GPU or exllamav2 installed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from consumer.engine.exllamav2 import convert
from tests.support.random_qwen2 import calibration_dir, quantize_exl2

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def exl2_like_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package laid out like exllamav2 0.3.2: `conversion/` has no __init__.py, and the
    package's own __init__ must not run (it would build the CUDA extension)."""
    package = tmp_path / "fake_exl2"
    data = package / "conversion" / "standard_cal_data"
    data.mkdir(parents=True)
    (data / "wiki.utf8").write_text("some calibration text\n", encoding="utf-8")
    (package / "__init__.py").write_text("raise RuntimeError('building the CUDA extension')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return data


def test_calibration_text_is_found_in_a_namespace_conversion_package(
    exl2_like_package: Path,
) -> None:
    assert calibration_dir("fake_exl2") == exl2_like_package


def test_a_missing_package_is_reported() -> None:
    with pytest.raises(RuntimeError, match="not installed"):
        calibration_dir("no_such_package_here")


class RecordedRun:
    """Stands in for subprocess.run; writes what the converter would leave in -cf."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict[str, str]]] = []

    def __call__(self, command: list[str], *, check: bool, env: dict[str, str]) -> Any:
        assert check
        self.calls.append((command, env))
        out = Path(command[command.index("-cf") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        (out / "tokenizer.json").write_text("{}")
        (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x"}))
        (out / "output.safetensors").write_bytes(b"\0")
        return subprocess.CompletedProcess(command, 0)


@pytest.fixture
def recorded_run(monkeypatch: pytest.MonkeyPatch) -> RecordedRun:
    run = RecordedRun()
    monkeypatch.setattr(convert.subprocess, "run", run)
    monkeypatch.delenv("EXLLAMA_NO_SDPA", raising=False)
    return run


def test_the_gpu_tests_quantize_with_sdpa_off(recorded_run: RecordedRun, tmp_path: Path) -> None:
    quantize_exl2(tmp_path / "hf", tmp_path / "exl2", tmp_path / "work", bits=4.5, length=256)
    ((command, env),) = recorded_run.calls
    assert env["EXLLAMA_NO_SDPA"] == "1"
    assert command[1:3] == ["-m", "exllamav2.conversion.convert_exl2"]
    assert command[command.index("-l") + 1] == command[command.index("-ml") + 1] == "256"
    assert "-nr" in command


def test_prepare_exl2_quantizes_with_sdpa_off(recorded_run: RecordedRun, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "prepare_exl2", ROOT / "ops" / "models" / "prepare_exl2.py"
    )
    assert spec is not None and spec.loader is not None
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    hf = tmp_path / "hf"
    hf.mkdir()
    prepare.quantize(str(hf), 4.5, 6, tmp_path / "out", tmp_path / "work", None)
    ((command, env),) = recorded_run.calls
    assert env["EXLLAMA_NO_SDPA"] == "1"
    assert command[command.index("-b") + 1] == "4.5"
    assert command[command.index("-hb") + 1] == "6"
    assert "-nr" not in command  # a long job resumes

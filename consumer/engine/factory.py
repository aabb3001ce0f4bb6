"""Pick and load the engine the settings ask for."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from consumer.engine.base import Engine
from consumer.engine.models import resolve_gguf
from consumer.settings import Settings

log = logging.getLogger(__name__)


def cuda_available() -> bool:
    """True when torch with CUDA and exllamav2 are importable and a GPU is visible."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("exllamav2") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def choose_backend(settings: Settings) -> str:
    backend = settings.engine.backend
    if backend != "auto":
        return backend
    # A GPU alone is not enough: the EXL2 model directory must be configured too.
    if settings.engine.exllamav2.model_dir is not None and cuda_available():
        return "exllamav2"
    return "llamacpp"


def load_engine(settings: Settings) -> Engine:
    """Load the configured model (blocking; call it off the event loop)."""
    backend = choose_backend(settings)
    if backend == "exllamav2":
        from consumer.engine.exllamav2 import load_exllamav2_engine

        if settings.engine.exllamav2.model_dir is not None:
            _announce_load("exllamav2", settings.engine.exllamav2.model_dir)
        return load_exllamav2_engine(settings.engine.exllamav2)
    from consumer.engine.llamacpp import LlamaCppEngine

    cfg = settings.engine.llamacpp
    path = resolve_gguf(cfg.model_path, cfg.hf_repo, cfg.hf_file)
    _announce_load("llamacpp", path)
    return LlamaCppEngine(
        path,
        n_ctx=cfg.n_ctx,
        n_threads=cfg.n_threads,
        n_batch=cfg.n_batch,
        seed=cfg.seed,
        repack_weights=cfg.repack_weights,
    )


def _announce_load(backend: str, model: Path) -> None:
    """Say what is about to load and how big it is: a large model takes a while, silently.

    (The engine logs `engine_loaded` with `load_s` once it is ready.)
    """
    files = [model] if model.is_file() else [p for p in model.glob("*") if p.is_file()]
    size_mb = sum(p.stat().st_size for p in files) / 1_000_000
    log.info(
        "model_loading", extra={"backend": backend, "model": model.name, "size_mb": round(size_mb)}
    )

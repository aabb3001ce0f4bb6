"""Pick and load the engine the settings ask for."""

from __future__ import annotations

import importlib.util
import logging

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

        return load_exllamav2_engine(settings.engine.exllamav2)
    from consumer.engine.llamacpp import LlamaCppEngine

    cfg = settings.engine.llamacpp
    path = resolve_gguf(cfg.model_path, cfg.hf_repo, cfg.hf_file)
    return LlamaCppEngine(
        path,
        n_ctx=cfg.n_ctx,
        n_threads=cfg.n_threads,
        n_batch=cfg.n_batch,
        seed=cfg.seed,
        repack_weights=cfg.repack_weights,
    )

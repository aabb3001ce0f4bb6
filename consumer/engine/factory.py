"""Pick and load the engine the settings ask for."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from consumer.engine.base import Engine
from consumer.engine.model_files import resolve_gguf
from consumer.engine.scheduler.policy import default_queue_limit
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
    """Load the configured model under the scheduler (blocking; call it off the event loop)."""
    backend = choose_backend(settings)
    scheduler = settings.engine.scheduler
    if backend == "exllamav2":
        from consumer.engine.exllamav2 import load_exllamav2_engine

        exl2 = settings.engine.exllamav2
        if exl2.model_dir is not None:
            _announce_load("exllamav2", exl2.model_dir)
        return load_exllamav2_engine(
            exl2,
            max_queued=queue_limit(settings, exl2.max_batch_size),
            output_weight=scheduler.output_weight,
        )
    from consumer.engine.llamacpp import LlamaCppBackend
    from consumer.engine.scheduler.engine import start_scheduled_engine

    cfg = settings.engine.llamacpp
    path = resolve_gguf(cfg.model_path, cfg.hf_repo, cfg.hf_file)
    _announce_load("llamacpp", path)
    slots = cpu_slots(settings)
    return start_scheduled_engine(
        lambda: LlamaCppBackend(
            path,
            slots=slots,
            n_ctx=cfg.n_ctx,
            n_threads=cfg.n_threads,
            n_batch=cfg.n_batch,
            seed=cfg.seed,
            repack_weights=cfg.repack_weights,
        ),
        max_queued=queue_limit(settings, slots),
        output_weight=scheduler.output_weight,
        fair_preemption=scheduler.fair_preemption,
        # The scheduler, not the backend, decides how much prompt a step takes.
        step_tokens=cfg.prefill_chunk_tokens,
        stall_after_s=scheduler.stall_after_s,
    )


def cpu_slots(settings: Settings) -> int:
    """`engine.llamacpp.slots`, or 4 per core, 4 to 16 (measured on 2 cores with SmolLM2:
    8 sequences per step decode ~1.5-1.7x the tokens/s of one at a time)."""
    configured = settings.engine.llamacpp.slots
    if configured is not None:
        return configured
    from consumer.engine.llamacpp.native import usable_cores

    return min(16, max(4, 4 * usable_cores()))


def queue_limit(settings: Settings, slots: int) -> int:
    """`engine.scheduler.max_queued`, or the scheduler's default for `slots`."""
    configured = settings.engine.scheduler.max_queued
    return configured if configured is not None else default_queue_limit(slots)


def _announce_load(backend: str, model: Path) -> None:
    """Say what is about to load and how big it is: a large model takes a while, silently.

    (The engine logs `engine_loaded` with `load_s` once it is ready.)
    """
    files = [model] if model.is_file() else [p for p in model.glob("*") if p.is_file()]
    size_mb = sum(p.stat().st_size for p in files) / 1_000_000
    log.info(
        "model_loading", extra={"backend": backend, "model": model.name, "size_mb": round(size_mb)}
    )

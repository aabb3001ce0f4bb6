"""load_exllamav2_engine: the exllamav2 model under the scheduler, as an asyncio Engine.

Everything that touches CUDA (torch, exllamav2, flash-attn) is imported lazily, inside
functions, so the package imports on machines without a GPU. The scheduler's thread
(`consumer.engine.scheduler`) loads the model and is from then on the one thread that uses the
GPU: it decides what runs (fairness between tenants, priority, deadlines, cancellation) and
steps the backend. With flash-attn (sm_80+) the backend drives exllamav2's paged dynamic
generator (continuous batching, prefix reuse); without it (e.g. a T4) it runs static padded
batches with a mask. Label scoring uses its own small cache in both modes and is interleaved
between decode steps. A failed request is answered and the engine serves on; a CUDA error
that poisons the context ends the process (`on_fatal`) so a fresh one takes over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from consumer.engine.exllamav2.errors import EngineConfigError
from consumer.engine.exllamav2.fatal import FatalHandler, cuda_context_alive, exit_process
from consumer.engine.exllamav2.loader import Runtime, load_runtime
from consumer.engine.exllamav2.startup import Startup, prepare_startup
from consumer.engine.scheduler.driver import Backend
from consumer.engine.scheduler.engine import ScheduledEngine, start_scheduled_engine
from consumer.engine.scheduler.policy import default_queue_limit
from consumer.settings.exllamav2 import ExLlamaV2Settings

log = logging.getLogger(__name__)


def open_backend(
    startup: Startup,
    runtime: Runtime,
    *,
    context_alive: Callable[[], bool] = cuda_context_alive,
) -> Backend:
    """The backend for the loaded runtime's batching mode (static without a generator)."""
    if runtime.generator is None:
        from consumer.engine.exllamav2.static_backend import StaticBackend

        return StaticBackend(startup, runtime, context_alive=context_alive)
    from consumer.engine.exllamav2.paged_backend import PagedBackend

    return PagedBackend(startup, runtime, context_alive=context_alive)


def start_exllamav2_engine(
    startup: Startup,
    *,
    load: Callable[[Startup], Runtime] = load_runtime,
    on_fatal: FatalHandler = exit_process,
    max_queued: int | None = None,
    output_weight: float = 2.0,
    context_alive: Callable[[], bool] = cuda_context_alive,
) -> ScheduledEngine:
    """Start the scheduler, load the model on its thread and wait until it serves (blocking).

    Raises EngineConfigError when loading fails.
    """

    def make_backend() -> Backend:
        return open_backend(startup, load(startup), context_alive=context_alive)

    started = time.monotonic()
    try:
        engine = start_scheduled_engine(
            make_backend,
            max_queued=max_queued or default_queue_limit(startup.settings.max_batch_size),
            output_weight=output_weight,
            on_fatal=on_fatal,
        )
    except EngineConfigError:
        raise
    except Exception as exc:
        raise EngineConfigError(f"exllamav2 failed to load the model: {exc}") from exc
    log.info("exl2_loaded", extra={"load_s": round(time.monotonic() - started, 1)})
    return engine


def load_exllamav2_engine(
    settings: ExLlamaV2Settings,
    *,
    on_fatal: FatalHandler = exit_process,
    max_queued: int | None = None,
    output_weight: float = 2.0,
) -> ScheduledEngine:
    """Check the GPU and VRAM, load the model and start serving (blocking, minutes).

    Call it off the event loop (e.g. `await asyncio.to_thread(load_exllamav2_engine, s)`).
    Raises EngineConfigError, with what to change, when it cannot run here. `on_fatal` is
    called if the GPU is lost later (default: exit the process with GPU_FATAL_EXIT_CODE).
    `max_queued` bounds the requests waiting to run (default: the scheduler's
    `default_queue_limit`); beyond it a request is refused as overloaded (retryable).
    `output_weight`: what a generated token costs a tenant against a prompt token in the
    scheduler's fairness counter.
    """
    return start_exllamav2_engine(
        prepare_startup(settings),
        on_fatal=on_fatal,
        max_queued=max_queued,
        output_weight=output_weight,
    )

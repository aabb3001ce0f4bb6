"""ExLlamaV2Engine, the Engine facade over the GPU worker, and load_exllamav2_engine to start it.

Everything that touches CUDA (torch, exllamav2, flash-attn) is imported lazily, inside
functions, so the package imports on machines without a GPU. One thread owns the GPU: it loads
the model, then loops over a queue of generate and score requests. With flash-attn (sm_80+) it
drives exllamav2's paged dynamic generator (continuous batching, prefix reuse); without it
(e.g. a T4) it runs static padded batches with a mask. Label scoring uses its own small cache
in both modes and is interleaved between decode steps. A failed request is answered and the
thread serves on; a CUDA error that poisons the context ends the process (`on_fatal`) so a
fresh one takes over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from consumer.engine.base import (
    BatchObserver,
    ChatMessage,
    EngineError,
    EngineInfo,
    Generation,
    GenerationRequest,
    Scores,
)
from consumer.engine.exllamav2.errors import EngineConfigError
from consumer.engine.exllamav2.fatal import FatalHandler, exit_process
from consumer.engine.exllamav2.startup import prepare_startup
from consumer.engine.exllamav2.worker import GpuWorker
from consumer.settings.exllamav2 import ExLlamaV2Settings

log = logging.getLogger("opstream.engine.exllamav2")


def _deliverer(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]
) -> Callable[[Any], None]:
    """A thread-safe way for the worker to resolve `future` on its event loop."""

    def settle(outcome: Any) -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def deliver(outcome: Any) -> None:
        loop.call_soon_threadsafe(settle, outcome)

    return deliver


class ExLlamaV2Engine:
    """The Engine backed by exllamav2; build it with `load_exllamav2_engine`."""

    def __init__(self, worker: GpuWorker) -> None:
        self._worker = worker
        self._start = worker.startup
        runtime = worker.ready.result()
        self._tokenizer = runtime.tokenizer
        self._tokenizer_lock = runtime.tokenizer_lock
        self._closed = False
        self._max_seq_len = self._start.settings.max_seq_len
        self._score_max_seq_len = self._start.settings.score_max_seq_len
        self._model_name = self._start.settings.model_name or (
            self._start.settings.model_dir.name if self._start.settings.model_dir else "exl2"
        )
        self._version = runtime.exllamav2_version

    # -- Engine ---------------------------------------------------------------------------

    @property
    def on_batch(self) -> BatchObserver | None:
        """Told the rows of each static decode step, the jobs of each paged step, 1 per score."""
        return self._worker.on_batch

    @on_batch.setter
    def on_batch(self, observer: BatchObserver | None) -> None:
        self._worker.on_batch = observer

    @property
    def on_fatal(self) -> FatalHandler:
        """Called from the GPU thread when the GPU is lost; by default exits the process."""
        return self._worker.on_fatal

    @on_fatal.setter
    def on_fatal(self, handler: FatalHandler) -> None:
        self._worker.on_fatal = handler

    @property
    def fatal_error(self) -> str | None:
        """Why the GPU can no longer run work in this process, or None while it can."""
        return self._worker.fatal_error

    @property
    def info(self) -> EngineInfo:
        fatal = self._worker.fatal_error
        details: dict[str, object] = {
            "batching_mode": self._start.decision.mode,
            "batching_reason": self._start.decision.reason,
            "cache_mode": self._start.settings.cache_mode,
            "max_seq_len": self._max_seq_len,
            "max_batch_size": self._start.settings.max_batch_size,
            "active_sequences": self._worker.active_rows,
            "queued_requests": self._worker.pending_generate,
            "vram_estimate_bytes": self._start.estimate.as_dict(),
            "exllamav2_version": self._version,
            "flash_attn_version": self._start.flash_attn.version,
            "flash_attn_problem": self._start.flash_attn.problem,
        }
        if self._start.decision.mode == "static":
            details["static_attention"] = self._start.settings.static_attention
        if fatal is not None:
            # Health turns unhealthy and /ready 503 on an engine `error`; querying a poisoned
            # CUDA context for memory would only raise again.
            details["error"] = f"GPU lost: {fatal}"
        else:
            details["gpus"] = self._gpu_state()
        return EngineInfo(
            backend="exllamav2",
            model=self._model_name,
            loaded=not self._closed and self._worker.is_alive() and fatal is None,
            details=details,
        )

    def _gpu_state(self) -> list[dict[str, object]]:
        import torch

        state: list[dict[str, object]] = []
        for gpu in self._start.gpus:
            free, total = torch.cuda.mem_get_info(gpu.index)
            state.append(
                {
                    "index": gpu.index,
                    "name": gpu.name,
                    "compute_capability": f"{gpu.capability[0]}.{gpu.capability[1]}",
                    "memory_used_bytes": int(total - free),
                    "memory_total_bytes": int(total),
                }
            )
        return state

    def count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            ids = self._tokenizer.encode(text, encode_special_tokens=False, add_bos=False)
        return int(ids.shape[-1])

    def _encode_prompt(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        prompt = self._start.template.render(messages, add_generation_prompt=True)
        with self._tokenizer_lock:
            ids = self._tokenizer.encode(prompt, encode_special_tokens=True, add_bos=False)
        return [int(t) for t in ids[0].tolist()]

    def _encode_candidate(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            ids = self._tokenizer.encode(text, encode_special_tokens=False, add_bos=False)
        return [int(t) for t in ids[0].tolist()]

    async def generate(self, request: GenerationRequest) -> Generation:
        self._check_open()
        if request.max_tokens < 1:
            raise EngineError("max_tokens must be at least 1", retryable=False)
        ids = self._encode_prompt(request.messages)
        if len(ids) + request.max_tokens > self._max_seq_len:
            raise EngineError(
                f"prompt of {len(ids)} tokens + max_tokens {request.max_tokens} exceeds "
                f"max_seq_len {self._max_seq_len}",
                retryable=False,
            )
        from consumer.engine.exllamav2.runner import GenTicket

        loop = asyncio.get_running_loop()
        future: asyncio.Future[Generation] = loop.create_future()
        ticket = GenTicket(ids=ids, request=request, deliver=_deliverer(loop, future))
        return await self._submit(ticket, future)

    async def score(self, messages: tuple[ChatMessage, ...], candidates: tuple[str, ...]) -> Scores:
        self._check_open()
        if not candidates:
            raise EngineError("no candidates to score", retryable=False)
        prompt_ids = self._encode_prompt(messages)
        candidate_ids = [self._encode_candidate(c) for c in candidates]
        longest = max(len(c) for c in candidate_ids) + 1
        if len(prompt_ids) + longest > self._score_max_seq_len:
            raise EngineError(
                f"prompt of {len(prompt_ids)} tokens + label of {longest} exceeds "
                f"score_max_seq_len {self._score_max_seq_len}",
                retryable=False,
            )
        from consumer.engine.exllamav2.runner import ScoreTicket

        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[float, ...]] = loop.create_future()
        ticket = ScoreTicket(
            prompt_ids=prompt_ids,
            candidates=candidate_ids,
            deliver=_deliverer(loop, future),
        )
        logprobs = await self._submit(ticket, future)
        return Scores(
            logprobs=logprobs,
            input_tokens=len(prompt_ids),
            scored_tokens=sum(len(c) + 1 for c in candidate_ids),
        )

    async def _submit(self, ticket: Any, future: asyncio.Future[Any]) -> Any:
        if not self._worker.submit(ticket):
            self._check_open()
            raise EngineError("exllamav2 engine is not running", retryable=True)
        try:
            return await future
        except asyncio.CancelledError:
            ticket.cancelled = True
            raise

    def _check_open(self) -> None:
        if self._worker.fatal_error is not None:
            raise EngineError(
                f"GPU lost ({self._worker.fatal_error}); this instance must restart",
                retryable=True,
            )
        if self._closed or not self._worker.is_alive():
            raise EngineError("exllamav2 engine is not running", retryable=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._worker.inbox.put(None)
        await asyncio.to_thread(self._worker.join)


def load_exllamav2_engine(
    settings: ExLlamaV2Settings, *, on_fatal: FatalHandler = exit_process
) -> ExLlamaV2Engine:
    """Check the GPU and VRAM, load the model and start the GPU worker (blocking, minutes).

    Call it off the event loop (e.g. `await asyncio.to_thread(load_exllamav2_engine, s)`).
    Raises EngineConfigError, with what to change, when it cannot run here. `on_fatal` is
    called if the GPU is lost later (default: exit the process with GPU_FATAL_EXIT_CODE).
    """
    worker = GpuWorker(prepare_startup(settings), on_fatal=on_fatal)
    worker.start()
    started = time.monotonic()
    try:
        worker.ready.result()
    except EngineConfigError:
        raise
    except Exception as exc:
        raise EngineConfigError(f"exllamav2 failed to load the model: {exc}") from exc
    log.info("exl2_loaded", extra={"load_s": round(time.monotonic() - started, 1)})
    return ExLlamaV2Engine(worker)

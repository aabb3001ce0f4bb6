"""The exllamav2 engine: an EXL2 model on NVIDIA GPUs, batched by one worker thread.

Everything that touches CUDA (torch, exllamav2, flash-attn) is imported lazily here, so the
package imports on machines without a GPU. One thread owns the GPU: it loads the model, then
loops over a queue of generate and score requests. With flash-attn (sm_80+) it drives
exllamav2's paged dynamic generator (continuous batching, prefix reuse); without it (e.g. a T4)
it runs static padded batches with a mask. Label scoring uses its own small cache in both modes
and is interleaved between decode steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consumer.engine.base import (
    BatchObserver,
    ChatMessage,
    EngineError,
    EngineInfo,
    FinishReason,
    Generation,
    GenerationRequest,
    Scores,
)
from consumer.engine.chat_template import ChatTemplate, load_chat_template
from consumer.engine.exllamav2.batching import QueuedShape, plan_static_batch
from consumer.engine.exllamav2.errors import EngineConfigError
from consumer.engine.exllamav2.modes import GpuFacts, ModeDecision, select_batching_mode
from consumer.engine.exllamav2.settings import ExLlamaV2Settings
from consumer.engine.exllamav2.vram import (
    GIB,
    MIB,
    ModelShape,
    VramEstimate,
    VramPlan,
    check_fits,
    weights_bytes_on_gpu,
)

log = logging.getLogger("opstream.engine.exllamav2")

_EOS_REASONS: dict[str, FinishReason] = {
    "stop_token": "stop",
    "stop_string": "stop",
    "end_filter": "stop",
    "max_new_tokens": "length",
}


def flash_attn_version() -> str | None:
    """The installed flash-attn version, read from package metadata without importing it."""
    try:
        return importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_gpus() -> list[GpuFacts]:
    """Every visible CUDA device, or an error saying there is none."""
    import torch

    if not torch.cuda.is_available():
        raise EngineConfigError(
            "exllamav2 needs an NVIDIA GPU with a CUDA build of torch; none is visible "
            f"(torch {torch.__version__}). Use the llamacpp engine on this machine."
        )
    facts = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        facts.append(
            GpuFacts(
                index=index,
                name=str(props.name),
                capability=(int(props.major), int(props.minor)),
                total_bytes=int(total),
                free_bytes=int(free),
            )
        )
    return facts


def read_model_dir(model_dir: Path) -> tuple[ModelShape, int]:
    """The model's shape and the bytes of its weights that go to the GPU."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise EngineConfigError(f"{config_path} not found: model_dir must be an EXL2 model folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    shape = ModelShape.from_config(config)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise EngineConfigError(f"no *.safetensors in {model_dir}")
    return shape, weights_bytes_on_gpu(sum(f.stat().st_size for f in files), shape)


def build_vram_plan(
    settings: ExLlamaV2Settings, shape: ModelShape, weights: int, decision: ModeDecision
) -> VramPlan:
    return VramPlan(
        shape=shape,
        weights_bytes=weights,
        mode=decision.mode,
        cache_mode=settings.cache_mode,
        max_seq_len=settings.max_seq_len,
        max_batch_size=settings.max_batch_size,
        paged_cache_tokens=settings.paged_cache_tokens,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        score_batch_size=settings.score_batch_size,
        score_max_seq_len=settings.score_max_seq_len,
        attention_budget_bytes=settings.attention_budget_mb * MIB,
        max_dq_elements=settings.max_dq_elements,
    )


@dataclass
class _Runtime:
    """What the worker loaded; touched only from the worker thread after start-up."""

    model: Any
    tokenizer: Any
    gen_cache: Any
    score_cache: Any
    generator: Any | None
    stop_ids: frozenset[int]
    end_of_turn_id: int
    pad_id: int
    exllamav2_version: str
    # The event loop encodes while the worker decodes; exllamav2's tokenizer builds lookup
    # tables lazily, so both sides take this lock.
    tokenizer_lock: threading.Lock


@dataclass
class _Startup:
    settings: ExLlamaV2Settings
    decision: ModeDecision
    template: ChatTemplate
    gpus: list[GpuFacts]
    estimate: VramEstimate
    runtime: _Runtime | None = None


def _cache_class(mode: str) -> Any:
    import exllamav2

    return {
        "fp16": exllamav2.ExLlamaV2Cache,
        "q8": exllamav2.ExLlamaV2Cache_Q8,
        "q6": exllamav2.ExLlamaV2Cache_Q6,
        "q4": exllamav2.ExLlamaV2Cache_Q4,
    }[mode]


def _load_runtime(start: _Startup) -> _Runtime:
    """Load model, caches, tokenizer (and the paged generator) on the calling thread."""
    settings = start.settings
    static = start.decision.mode == "static"
    if static and "exllamav2" not in sys.modules:
        # On sm_75 an installed flash-attn imports fine but fails at run time; exllamav2 reads
        # this once, at import. config.no_flash_attn below covers an earlier import.
        os.environ["EXLLAMA_NO_FLASH_ATTN"] = "1"

    from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2 import __version__ as exl2_version

    assert settings.model_dir is not None
    config = ExLlamaV2Config(str(settings.model_dir))
    config.max_seq_len = settings.max_seq_len
    config.max_dq_size = settings.max_dq_elements
    shape = ModelShape.from_config(json.loads((settings.model_dir / "config.json").read_text()))
    if static:
        batch = settings.max_batch_size
        config.max_batch_size = batch
        config.max_input_len = max(settings.prefill_chunk_tokens // batch, 16)
        # Masked batches need exllamav2's torch attention. flash-attn and xformers only take
        # unmasked (causal) batches; 0.3.2's SDPA branch drops the padding mask, so use its
        # matmul attention, which applies causal + padding masks, and bound its score matrix.
        config.no_flash_attn = True
        config.no_xformers = True
        config.no_sdpa = True
        config.max_attention_size = max(
            settings.attention_budget_mb * MIB // (batch * shape.num_heads * 2 * 3), 128 * 128
        )
    else:
        from exllamav2.attn import has_flash_attn_with_paged

        if not has_flash_attn_with_paged:
            raise EngineConfigError(
                "flash-attn is installed but exllamav2 cannot use its paged kernels "
                "(import failed or too old); set batching_mode=static"
            )
        config.max_batch_size = 1
        config.max_input_len = settings.prefill_chunk_tokens
    config.arch_compat_overrides(quiet=True)

    model = ExLlamaV2(config)
    cache_cls = _cache_class(settings.cache_mode)
    rows, length = (
        (settings.max_batch_size, settings.max_seq_len)
        if static
        else (1, settings.paged_cache_tokens)
    )
    progress = settings.progress_bar
    callback = None if progress else _log_progress
    if settings.gpu_split is None:
        gen_cache = cache_cls(model, batch_size=rows, max_seq_len=length, lazy=True)
        model.load_autosplit(
            gen_cache,
            reserve_vram=settings.vram_reserve_mb * MIB,
            progress=progress,
            callback=callback,
        )
    else:
        model.load(settings.gpu_split, progress=progress, callback=callback)
        gen_cache = cache_cls(model, batch_size=rows, max_seq_len=length)
    score_cache = cache_cls(
        model, batch_size=settings.score_batch_size, max_seq_len=settings.score_max_seq_len
    )
    tokenizer = ExLlamaV2Tokenizer(config)

    eos = tokenizer.eos_token_id
    stop = {eos} if isinstance(eos, int) else set()
    generation_config = getattr(config, "generation_config", None) or {}
    stop.update(t for t in (generation_config.get("eos_token_id") or []) if isinstance(t, int))
    eot_text = start.template.end_of_turn()
    eot_id = tokenizer.single_id(eot_text) if eot_text else None
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        marker_id = tokenizer.single_id(marker)
        if isinstance(marker_id, int):
            stop.add(marker_id)
    if not isinstance(eot_id, int):
        eot_id = eos
    stop.add(eot_id)
    pad = tokenizer.pad_token_id
    pad_id = pad if isinstance(pad, int) and pad >= 0 else eot_id

    generator = None
    if not static:
        from exllamav2.generator import ExLlamaV2DynamicGenerator

        generator = ExLlamaV2DynamicGenerator(
            model=model,
            cache=gen_cache,
            tokenizer=tokenizer,
            max_batch_size=settings.max_batch_size,
            max_seq_len=settings.max_seq_len,
            max_chunk_size=settings.prefill_chunk_tokens,
            paged=True,
        )
    return _Runtime(
        model=model,
        tokenizer=tokenizer,
        gen_cache=gen_cache,
        score_cache=score_cache,
        generator=generator,
        stop_ids=frozenset(stop),
        end_of_turn_id=eot_id,
        pad_id=pad_id,
        exllamav2_version=str(exl2_version),
        tokenizer_lock=threading.Lock(),
    )


def _log_progress(done: int, total: int) -> None:
    if total and (done == total or done % max(total // 4, 1) == 0):
        log.info("exl2_load_progress done=%d total=%d", done, total)


class _Worker(threading.Thread):
    """The one thread that owns the GPU: loads the model, then schedules all requests."""

    def __init__(self, start: _Startup) -> None:
        super().__init__(name="exl2-gpu", daemon=True)
        self.startup = start
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.ready: concurrent.futures.Future[_Runtime] = concurrent.futures.Future()
        self.active_rows = 0
        self.pending_generate = 0
        self.on_batch: BatchObserver | None = None
        self._runner: Any = None  # consumer.engine.exllamav2.runner, imported with torch

    # -- thread entry -------------------------------------------------------------------

    def run(self) -> None:
        try:
            from consumer.engine.exllamav2 import runner

            self._runner = runner
            runtime = _load_runtime(self.startup)
        except BaseException as exc:
            self.ready.set_exception(exc)
            return
        self.startup.runtime = runtime
        self.ready.set_result(runtime)
        try:
            if runtime.generator is None:
                self._serve_static(runtime)
            else:
                self._serve_paged(runtime)
        finally:
            self._unload(runtime)

    # -- shared helpers -----------------------------------------------------------------

    def _drain(self, block: bool) -> tuple[list[Any], bool]:
        """New tickets from the inbox, and whether close() has been called."""
        items: list[Any] = []
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                if item is None:
                    return items, True
                items.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return items, False

    def _report_batch(self, size: int) -> None:
        observer = self.on_batch
        if observer is None:
            return
        try:
            observer(size)
        except Exception:
            # A metrics hook must not take the GPU thread, and every request with it, down.
            log.exception("exl2_batch_observer_failed size=%d", size)

    def _score(self, runtime: _Runtime, ticket: Any) -> None:
        if ticket.cancelled:
            return
        self._report_batch(1)
        try:
            logprobs = self._runner.score_candidates(
                runtime.model,
                runtime.score_cache,
                ticket,
                end_of_turn_id=runtime.end_of_turn_id,
                pad_id=runtime.pad_id,
            )
        except Exception as exc:
            log.exception("exl2_score_failed candidates=%d", len(ticket.candidates))
            ticket.deliver(_as_engine_error(exc))
            return
        ticket.deliver(logprobs)

    def _decode(self, runtime: _Runtime) -> Callable[[list[int]], str]:
        import torch

        def decode(ids: list[int]) -> str:
            if not ids:
                return ""
            with runtime.tokenizer_lock:
                text = runtime.tokenizer.decode(
                    torch.tensor(ids, dtype=torch.long), decode_special_tokens=False
                )
            return str(text)

        return decode

    # -- static batching (no flash-attn) ------------------------------------------------

    def _serve_static(self, runtime: _Runtime) -> None:
        settings = self.startup.settings
        waiting: deque[Any] = deque()
        scoring: deque[Any] = deque()
        batch = None
        decode = self._decode(runtime)
        while True:
            idle = batch is None and not waiting and not scoring
            items, closing = self._drain(block=idle)
            if closing:
                self._fail_all([*waiting, *scoring, *batch_tickets(batch), *items], closing=True)
                return
            for item in items:
                (scoring if isinstance(item, self._runner.ScoreTicket) else waiting).append(item)
            if scoring:
                self._score(runtime, scoring.popleft())
            if batch is None and waiting:
                live = [t for t in waiting if not t.cancelled]
                waiting.clear()
                picks = plan_static_batch(
                    [QueuedShape(len(t.ids), t.request.max_tokens) for t in live],
                    max_batch_size=settings.max_batch_size,
                    max_seq_len=settings.max_seq_len,
                )
                picked = set(picks)
                chosen = [live[i] for i in picks]
                waiting.extend(t for i, t in enumerate(live) if i not in picked)
                if chosen:
                    try:
                        batch = self._runner.StaticBatch(
                            runtime.model,
                            runtime.gen_cache,
                            chosen,
                            pad_id=runtime.pad_id,
                            stop_ids=runtime.stop_ids,
                            decode=decode,
                        )
                        batch.prefill()
                    except Exception as exc:
                        log.exception("exl2_static_prefill_failed rows=%d", len(chosen))
                        self._fail_all(chosen, error=_as_engine_error(exc))
                        batch = None
            self.pending_generate = len(waiting)
            if batch is not None:
                self.active_rows = batch.size
                self._report_batch(batch.size)
                try:
                    batch.step()
                except Exception as exc:
                    log.exception("exl2_static_step_failed rows=%d", batch.size)
                    self._fail_all(batch_tickets(batch), error=_as_engine_error(exc))
                    batch = None
                    continue
                if batch.finished:
                    for ticket, generation in batch.results():
                        ticket.deliver(generation)
                    batch = None
                    self.active_rows = 0

    # -- paged continuous batching (flash-attn) -----------------------------------------

    def _serve_paged(self, runtime: _Runtime) -> None:
        import torch
        from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

        generator = runtime.generator
        assert generator is not None
        scoring: deque[Any] = deque()
        jobs: dict[int, tuple[Any, Any]] = {}  # id(ticket) -> (ticket, job)
        while True:
            items, closing = self._drain(block=not jobs and not scoring)
            if closing:
                self._fail_all([*scoring, *(t for t, _ in jobs.values()), *items], closing=True)
                return
            for item in items:
                if isinstance(item, self._runner.ScoreTicket):
                    scoring.append(item)
                    continue
                request = item.request
                if request.temperature <= 0.0:
                    sampler = ExLlamaV2Sampler.Settings.greedy()
                else:
                    sampler = ExLlamaV2Sampler.Settings(
                        temperature=request.temperature,
                        top_p=request.top_p if request.top_p < 1.0 else 0.0,
                        top_k=0,
                        token_repetition_penalty=1.0,
                    )
                job = ExLlamaV2DynamicJob(
                    input_ids=torch.tensor([item.ids], dtype=torch.long),
                    max_new_tokens=request.max_tokens,
                    gen_settings=sampler,
                    seed=request.seed,
                    stop_conditions=[*sorted(runtime.stop_ids), *(s for s in request.stop if s)],
                    identifier=item,
                )
                generator.enqueue(job)
                jobs[id(item)] = (item, job)
            for ticket, job in list(jobs.values()):
                if ticket.cancelled:
                    generator.cancel(job)
                    del jobs[id(ticket)]
            if scoring:
                self._score(runtime, scoring.popleft())
            if not jobs:
                continue
            try:
                results = generator.iterate()
            except Exception as exc:
                log.exception("exl2_paged_iterate_failed jobs=%d", len(jobs))
                for _, job in jobs.values():
                    generator.cancel(job)
                self._fail_all([t for t, _ in jobs.values()], error=_as_engine_error(exc))
                jobs.clear()
                continue
            now = time.monotonic()
            decoded: set[int] = set()  # jobs that sampled a token in this step
            for result in results:
                ticket = result.get("identifier")
                if ticket is None:
                    continue
                if result.get("stage") == "streaming":
                    decoded.add(id(ticket))
                if result.get("stage") == "started" and ticket.started is None:
                    ticket.started = now
                if result.get("stage") == "streaming" and ticket.first_token_at is None:
                    ticket.first_token_at = now
                if result.get("eos"):
                    jobs.pop(id(ticket), None)
                    reason = _EOS_REASONS.get(str(result.get("eos_reason")), "stop")
                    ticket.deliver(
                        self._runner.finish_generation(
                            ticket,
                            str(result.get("full_completion", "")),
                            reason,
                            int(result.get("new_tokens", 0)),
                        )
                    )
            if decoded:
                self._report_batch(len(decoded))
            self.active_rows = len(generator.active_jobs)
            self.pending_generate = len(generator.pending_jobs)

    # -- shutdown -----------------------------------------------------------------------

    def _fail_all(
        self, tickets: list[Any], *, error: BaseException | None = None, closing: bool = False
    ) -> None:
        if closing:
            error = EngineError("engine is shutting down", retryable=True)
        for ticket in tickets:
            if not ticket.cancelled:
                ticket.deliver(error or EngineError("engine failed", retryable=True))

    def _unload(self, runtime: _Runtime) -> None:
        import torch

        if runtime.generator is not None:
            runtime.generator.clear_queue()
        runtime.model.unload()
        self.startup.runtime = None
        torch.cuda.empty_cache()


def batch_tickets(batch: Any) -> list[Any]:
    return [] if batch is None else [row.ticket for row in batch.rows]


def _as_engine_error(exc: BaseException) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    out_of_memory = "out of memory" in str(exc).lower()
    message = "GPU out of memory" if out_of_memory else f"GPU worker failed: {type(exc).__name__}"
    return EngineError(message, retryable=True)


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

    def __init__(self, worker: _Worker) -> None:
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
    def info(self) -> EngineInfo:
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
            "flash_attn_version": flash_attn_version(),
            "gpus": self._gpu_state(),
        }
        return EngineInfo(
            backend="exllamav2",
            model=self._model_name,
            loaded=not self._closed and self._worker.is_alive(),
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
        self._worker.inbox.put(ticket)
        try:
            return await future
        except asyncio.CancelledError:
            ticket.cancelled = True
            raise

    def _check_open(self) -> None:
        if self._closed or not self._worker.is_alive():
            raise EngineError("exllamav2 engine is not running", retryable=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._worker.inbox.put(None)
        await asyncio.to_thread(self._worker.join)


def prepare_startup(settings: ExLlamaV2Settings) -> _Startup:
    """Everything that can fail cheaply, before any weights are read: GPU, mode, template, VRAM."""
    if settings.model_dir is None:
        raise EngineConfigError(
            "exllamav2.model_dir is not set (OPSTREAM_ENGINE__EXLLAMAV2__MODEL_DIR)"
        )
    if not settings.model_dir.is_dir():
        raise EngineConfigError(f"exllamav2.model_dir {settings.model_dir} is not a directory")
    template = load_chat_template(settings.model_dir)
    shape, weights = read_model_dir(settings.model_dir)
    gpus = probe_gpus()
    decision = select_batching_mode(settings.batching_mode, gpus, flash_attn_version())
    plan = build_vram_plan(settings, shape, weights, decision)
    reserve = settings.vram_reserve_mb * MIB
    if settings.gpu_split is None:
        available = sum(max(g.free_bytes - reserve, 0) for g in gpus)
    else:
        used = gpus[: len(settings.gpu_split)]
        available = sum(max(g.free_bytes - reserve, 0) for g in used)
    names = ", ".join(f"{g.name} ({g.free_bytes / GIB:.1f} GiB free)" for g in gpus)
    estimate = check_fits(plan, available, device_names=names)
    log.info(
        "exl2_startup mode=%s reason=%r estimate_gib=%.2f available_gib=%.2f",
        decision.mode,
        decision.reason,
        estimate.total / GIB,
        available / GIB,
    )
    return _Startup(
        settings=settings, decision=decision, template=template, gpus=gpus, estimate=estimate
    )


def load_exllamav2_engine(settings: ExLlamaV2Settings) -> ExLlamaV2Engine:
    """Check the GPU and VRAM, load the model and start the GPU worker (blocking, minutes).

    Call it off the event loop (e.g. `await asyncio.to_thread(load_exllamav2_engine, s)`).
    Raises EngineConfigError, with what to change, when it cannot run here.
    """
    worker = _Worker(prepare_startup(settings))
    worker.start()
    started = time.monotonic()
    try:
        worker.ready.result()
    except EngineConfigError:
        raise
    except Exception as exc:
        raise EngineConfigError(f"exllamav2 failed to load the model: {exc}") from exc
    log.info("exl2_loaded seconds=%.1f", time.monotonic() - started)
    return ExLlamaV2Engine(worker)

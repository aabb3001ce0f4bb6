"""The exllamav2 engine: an EXL2 model on NVIDIA GPUs, batched by one worker thread.

Everything that touches CUDA (torch, exllamav2, flash-attn) is imported lazily here, so the
package imports on machines without a GPU. One thread owns the GPU: it loads the model, then
loops over a queue of generate and score requests. With flash-attn (sm_80+) it drives
exllamav2's paged dynamic generator (continuous batching, prefix reuse); without it (e.g. a T4)
it runs static padded batches with a mask. Label scoring uses its own small cache in both modes
and is interleaved between decode steps. A failed request is answered and the thread serves on;
a CUDA error that poisons the context ends the process (`on_fatal`) so a fresh one takes over.
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
    Generation,
    GenerationRequest,
    Scores,
)
from consumer.engine.chat_template import ChatTemplate, load_chat_template
from consumer.engine.exllamav2.batching import QueuedShape, paged_completion, plan_static_batch
from consumer.engine.exllamav2.errors import EngineConfigError, is_sticky_cuda_error
from consumer.engine.exllamav2.limits import check_plan, static_max_attention_size
from consumer.engine.exllamav2.modes import GpuFacts, ModeDecision, select_batching_mode
from consumer.engine.exllamav2.vram import (
    GIB,
    MIB,
    ModelShape,
    VramEstimate,
    VramPlan,
    check_fits,
    weights_bytes_on_gpu,
)
from consumer.settings.exllamav2 import ExLlamaV2Settings

log = logging.getLogger("opstream.engine.exllamav2")

# Exit status after the GPU is lost (sysexits EX_SOFTWARE): a supervisor restarts the process.
GPU_FATAL_EXIT_CODE = 70
# Called once, from the worker thread, with the reason, when the GPU can no longer run work.
FatalHandler = Callable[[str], None]


def flash_attn_version() -> str | None:
    """The installed flash-attn version, read from package metadata without importing it."""
    try:
        return importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True, slots=True)
class FlashAttnProbe:
    """flash-attn as exllamav2 will see it: the installed version, and why it is unusable."""

    version: str | None
    problem: str | None = None


def probe_flash_attn() -> FlashAttnProbe:
    """Import flash-attn the way exllamav2 0.3.2 does, without letting a broken build crash us.

    exllamav2's `attn.py` imports `flash_attn` and `flash_attn_2_cuda` at import time and only
    catches ModuleNotFoundError; a wheel built for another torch raises ImportError ("undefined
    symbol") and takes `import exllamav2` down with it. Trying it here first lets start-up fall
    back to static batching (with EXLLAMA_NO_FLASH_ATTN set) and say why.
    """
    version = flash_attn_version()
    if version is None:
        return FlashAttnProbe(None)
    if "EXLLAMA_NO_FLASH_ATTN" in os.environ:
        return FlashAttnProbe(version, "EXLLAMA_NO_FLASH_ATTN is set")
    try:
        import flash_attn  # noqa: F401
        import flash_attn_2_cuda  # noqa: F401
    except Exception as exc:  # any failure means the same thing: exllamav2 cannot use it
        first_line = (str(exc).splitlines() or [""])[0][:300]
        log.warning(
            "exl2_flash_attn_unusable", extra={"version": version, "error": type(exc).__name__}
        )
        return FlashAttnProbe(version, f"fails to import ({type(exc).__name__}: {first_line})")
    return FlashAttnProbe(version)


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
        static_attention=settings.static_attention,
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
    # Ids the tokenizer can produce; the model's head may be wider (Qwen2.5: 151,665 of 152,064).
    vocab_size: int | None = None


@dataclass
class _Startup:
    settings: ExLlamaV2Settings
    decision: ModeDecision
    template: ChatTemplate
    gpus: list[GpuFacts]
    estimate: VramEstimate
    runtime: _Runtime | None = None
    flash_attn: FlashAttnProbe = FlashAttnProbe(None)


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
        # On sm_75 an installed flash-attn imports fine but fails at run time, and a broken
        # build fails exllamav2's own import; exllamav2 reads this once, at import.
        # config.no_flash_attn below covers an earlier import.
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
        # Masked batches need torch attention: flash-attn and xformers only take unmasked
        # (causal) batches, and 0.3.2's SDPA branch drops the mask (bidirectional attention).
        # With no_sdpa, exllamav2 falls back to its matmul attention, which applies causal +
        # padding masks; static_attention=sdpa replaces that with SDPA over grouped KV heads.
        config.no_flash_attn = True
        config.no_xformers = True
        config.no_sdpa = True
        config.max_attention_size = static_max_attention_size(
            settings.attention_budget_mb * MIB, batch, shape.num_heads
        )
        if settings.static_attention == "sdpa":
            from consumer.engine.exllamav2.attention import use_grouped_attention

            use_grouped_attention(config)
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
        vocab_size=int(tokenizer.get_vocab_size()),
    )


def _log_progress(done: int, total: int) -> None:
    if total and (done == total or done % max(total // 4, 1) == 0):
        log.info("exl2_load_progress", extra={"done": done, "total": total})


def cuda_context_alive() -> bool:
    """False once the CUDA context is poisoned: then even a synchronize fails."""
    import torch

    try:
        torch.cuda.synchronize()
    except RuntimeError:
        log.warning("exl2_cuda_context_lost", exc_info=True)
        return False
    return True


def exit_process(reason: str) -> None:
    """The default reaction to a lost GPU: end the process now, with a non-zero status.

    A poisoned CUDA context cannot be repaired from inside the process. Exiting at once, like
    a crash, leaves the offsets of everything in flight uncommitted, so Kafka redelivers those
    records to the restarted (or another) instance instead of their producers getting errors.
    """
    log.critical("exl2_gpu_fatal_exit", extra={"code": GPU_FATAL_EXIT_CODE, "reason": reason})
    logging.shutdown()
    sys.stderr.flush()
    os._exit(GPU_FATAL_EXIT_CODE)


class GpuLost(Exception):
    """The GPU can no longer run work in this process; the worker must stop."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Worker(threading.Thread):
    """The one thread that owns the GPU: loads the model, then schedules all requests.

    Every ticket taken from the inbox is answered exactly once (or dropped when its caller
    cancelled it): a failure fails only the requests it touched, and the thread serves on. A
    sticky CUDA error is the exception: the worker marks itself fatal, calls `on_fatal`
    (default: exit the process) and fails whatever is still open.
    """

    def __init__(
        self,
        start: _Startup,
        *,
        load: Callable[[_Startup], _Runtime] = _load_runtime,
        on_fatal: FatalHandler = exit_process,
        context_alive: Callable[[], bool] = cuda_context_alive,
    ) -> None:
        super().__init__(name="exl2-gpu", daemon=True)
        self.startup = start
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.ready: concurrent.futures.Future[_Runtime] = concurrent.futures.Future()
        self.active_rows = 0
        self.pending_generate = 0
        self.on_batch: BatchObserver | None = None
        self.on_fatal = on_fatal
        self.fatal_error: str | None = None
        self._load = load
        self._context_alive = context_alive
        self._runner: Any = None  # consumer.engine.exllamav2.runner, imported with torch
        self._open: dict[int, Any] = {}  # id(ticket) -> taken from the inbox, not yet answered
        # Once the worker stops accepting, no ticket may enter the inbox unanswered.
        self._inbox_lock = threading.Lock()
        self._accepting = True

    def submit(self, ticket: Any) -> bool:
        """Queue a ticket for the GPU; False once the worker has stopped taking work."""
        with self._inbox_lock:
            if self._accepting:
                self.inbox.put(ticket)
            return self._accepting

    # -- thread entry -------------------------------------------------------------------

    def run(self) -> None:
        try:
            from consumer.engine.exllamav2 import runner

            self._runner = runner
            runtime = self._load(self.startup)
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
        except GpuLost as lost:
            self._die(lost.reason)
        except Exception as exc:
            # A defect in the loop itself: its state is unknown, so nothing may keep waiting.
            log.exception("exl2_worker_failed", extra={"open": len(self._open)})
            self._die(f"GPU worker failed: {type(exc).__name__}: {exc}")
        if self.fatal_error is None:
            self._unload(runtime)

    # -- bookkeeping ----------------------------------------------------------------------

    def _drain(self, block: bool) -> tuple[list[Any], bool]:
        """New tickets from the inbox, and whether close() has been called."""
        items: list[Any] = []
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                if item is None:
                    return items, True
                items.append(item)
                self._open[id(item)] = item
                item = self.inbox.get_nowait()
        except queue.Empty:
            return items, False

    def _deliver(self, ticket: Any, outcome: Any) -> None:
        self._open.pop(id(ticket), None)
        ticket.deliver(outcome)

    def _forget(self, ticket: Any) -> None:
        """Drop a ticket its caller cancelled; nobody waits for its outcome."""
        self._open.pop(id(ticket), None)

    def _fail(
        self, tickets: list[Any], exc: BaseException, event: str, *, rejected: bool = False
    ) -> None:
        """Answer `tickets` with the error `exc` caused, unless it cost us the GPU.

        `rejected`: exllamav2 refused these requests before running them (an assertion on
        their size), so trying again would fail the same way.
        """
        log.error(
            event,
            extra={"requests": len(tickets), "error": type(exc).__name__},
            exc_info=exc,
        )
        if is_sticky_cuda_error(exc) or not self._context_alive():
            raise GpuLost(f"{type(exc).__name__}: {exc}") from exc
        error = _as_engine_error(exc, rejected=rejected)
        for ticket in tickets:
            self._deliver(ticket, error)

    def _fail_open(self, error: EngineError) -> None:
        """Stop taking work; answer every ticket still open or queued with `error`."""
        with self._inbox_lock:
            self._accepting = False
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._open[id(item)] = item
        for ticket in list(self._open.values()):
            self._deliver(ticket, error)

    def _die(self, reason: str) -> None:
        self.fatal_error = reason
        log.critical("exl2_gpu_fatal", extra={"reason": reason, "open": len(self._open)})
        try:
            self.on_fatal(reason)
        finally:
            # Reached only if on_fatal returns (the default exits): answer what is left.
            self._fail_open(
                EngineError(f"GPU failed ({reason}); this instance must restart", retryable=True)
            )

    def _report_batch(self, size: int) -> None:
        observer = self.on_batch
        if observer is None:
            return
        try:
            observer(size)
        except Exception:
            # A metrics hook must not take the GPU thread, and every request with it, down.
            log.exception("exl2_batch_observer_failed", extra={"size": size})

    def _score(self, runtime: _Runtime, ticket: Any) -> None:
        if ticket.cancelled:
            self._forget(ticket)
            return
        self._report_batch(1)
        try:
            logprobs = self._runner.score_candidates(
                runtime.model,
                runtime.score_cache,
                ticket,
                end_of_turn_id=runtime.end_of_turn_id,
                pad_id=runtime.pad_id,
                vocab_size=runtime.vocab_size,
            )
        except Exception as exc:
            self._fail([ticket], exc, "exl2_score_failed")
            return
        self._deliver(ticket, logprobs)

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
        waiting: deque[Any] = deque()
        scoring: deque[Any] = deque()
        batch = None
        decode = self._decode(runtime)
        while True:
            idle = batch is None and not waiting and not scoring
            items, closing = self._drain(block=idle)
            if closing:
                self._fail_open(EngineError("engine is shutting down", retryable=True))
                return
            for item in items:
                (scoring if isinstance(item, self._runner.ScoreTicket) else waiting).append(item)
            if scoring:
                self._score(runtime, scoring.popleft())
            if batch is None and waiting:
                batch = self._start_static_batch(runtime, waiting, decode)
            self.pending_generate = len(waiting)
            if batch is None:
                continue
            self.active_rows = batch.size
            self._report_batch(batch.size)
            try:
                batch.step()
            except Exception as exc:
                live = [t for t in batch_tickets(batch) if not t.cancelled]
                for ticket in batch_tickets(batch):
                    if ticket.cancelled:
                        self._forget(ticket)
                batch, self.active_rows = None, 0
                self._fail(live, exc, "exl2_static_step_failed")
                continue
            if batch.finished:
                for ticket, generation in batch.results():
                    self._deliver(ticket, generation)
                for ticket in batch_tickets(batch):
                    self._forget(ticket)  # the cancelled rows; the rest are answered
                batch, self.active_rows = None, 0

    def _start_static_batch(
        self, runtime: _Runtime, waiting: deque[Any], decode: Callable[[list[int]], str]
    ) -> Any:
        """Take the next static batch from `waiting` and prefill it; None if none could start."""
        settings = self.startup.settings
        live = []
        for ticket in waiting:
            if ticket.cancelled:
                self._forget(ticket)
            else:
                live.append(ticket)
        waiting.clear()
        picks = plan_static_batch(
            [QueuedShape(len(t.ids), t.request.max_tokens) for t in live],
            max_batch_size=settings.max_batch_size,
            max_seq_len=settings.max_seq_len,
        )
        picked = set(picks)
        chosen = [live[i] for i in picks]
        waiting.extend(t for i, t in enumerate(live) if i not in picked)
        if not chosen:
            return None
        try:
            batch = self._runner.StaticBatch(
                runtime.model,
                runtime.gen_cache,
                chosen,
                pad_id=runtime.pad_id,
                stop_ids=runtime.stop_ids,
                decode=decode,
                vocab_size=runtime.vocab_size,
            )
            batch.prefill()
        except Exception as exc:
            self._fail(chosen, exc, "exl2_static_prefill_failed")
            return None
        return batch

    # -- paged continuous batching (flash-attn) -----------------------------------------

    def _serve_paged(self, runtime: _Runtime) -> None:
        generator = runtime.generator
        assert generator is not None
        decode = self._decode(runtime)
        scoring: deque[Any] = deque()
        jobs: dict[int, tuple[Any, Any]] = {}  # id(ticket) -> (ticket, job)
        while True:
            items, closing = self._drain(block=not jobs and not scoring)
            if closing:
                self._fail_open(EngineError("engine is shutting down", retryable=True))
                return
            for item in items:
                if isinstance(item, self._runner.ScoreTicket):
                    scoring.append(item)
                    continue
                job = self._enqueue_paged(generator, runtime.stop_ids, item)
                if job is not None:
                    jobs[id(item)] = (item, job)
            for ticket, job in list(jobs.values()):
                if ticket.cancelled:
                    del jobs[id(ticket)]
                    self._forget(ticket)
                    self._cancel_paged(generator, job)
            if scoring:
                self._score(runtime, scoring.popleft())
            if not jobs:
                continue
            try:
                results = generator.iterate()
            except Exception as exc:
                running = list(jobs.values())
                jobs.clear()
                self._fail([t for t, _ in running], exc, "exl2_paged_iterate_failed")
                for _, job in running:
                    self._cancel_paged(generator, job)
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
                if result.get("eos") and jobs.pop(id(ticket), None) is not None:
                    done = paged_completion(result, decode)
                    self._deliver(
                        ticket,
                        self._runner.finish_generation(
                            ticket, done.text, done.reason, done.output_tokens
                        ),
                    )
            if decoded:
                self._report_batch(len(decoded))
            self.active_rows = len(generator.active_jobs)
            self.pending_generate = len(generator.pending_jobs)

    def _enqueue_paged(self, generator: Any, stop_ids: frozenset[int], ticket: Any) -> Any:
        """Hand one request to the paged generator; None if it was refused (and answered)."""
        try:
            job = make_paged_job(ticket, stop_ids)
            generator.enqueue(job)
        except Exception as exc:
            self._fail([ticket], exc, "exl2_paged_enqueue_failed", rejected=True)
            return None
        return job

    def _cancel_paged(self, generator: Any, job: Any) -> None:
        try:
            generator.cancel(job)
        except Exception as exc:
            # The job may keep running to its own end; its results are ignored.
            log.error("exl2_paged_cancel_failed", extra={"error": type(exc).__name__}, exc_info=exc)
            if is_sticky_cuda_error(exc) or not self._context_alive():
                raise GpuLost(f"{type(exc).__name__}: {exc}") from exc

    # -- shutdown -----------------------------------------------------------------------

    def _unload(self, runtime: _Runtime) -> None:
        import torch

        try:
            if runtime.generator is not None:
                runtime.generator.clear_queue()
            runtime.model.unload()
        finally:
            self.startup.runtime = None
            torch.cuda.empty_cache()


def make_paged_job(ticket: Any, stop_ids: frozenset[int]) -> Any:
    """The ExLlamaV2DynamicJob for a generate ticket (greedy, or temperature + top_p)."""
    import torch
    from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

    request = ticket.request
    if request.temperature <= 0.0:
        sampler = ExLlamaV2Sampler.Settings.greedy()
    else:
        sampler = ExLlamaV2Sampler.Settings(
            temperature=request.temperature,
            top_p=request.top_p if request.top_p < 1.0 else 0.0,
            top_k=0,
            token_repetition_penalty=1.0,
        )
    return ExLlamaV2DynamicJob(
        input_ids=torch.tensor([ticket.ids], dtype=torch.long),
        max_new_tokens=request.max_tokens,
        gen_settings=sampler,
        seed=request.seed,
        stop_conditions=[*sorted(stop_ids), *(s for s in request.stop if s)],
        identifier=ticket,
    )


def batch_tickets(batch: Any) -> list[Any]:
    return [] if batch is None else [row.ticket for row in batch.rows]


def _as_engine_error(exc: BaseException, *, rejected: bool = False) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    if "out of memory" in str(exc).lower():
        return EngineError("GPU out of memory", retryable=True)
    if rejected and isinstance(exc, AssertionError | ValueError | TypeError):
        return EngineError(f"exllamav2 refused the request: {exc}", retryable=False)
    return EngineError(f"GPU worker failed: {type(exc).__name__}", retryable=True)


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


def prepare_startup(settings: ExLlamaV2Settings) -> _Startup:
    """Everything that can fail cheaply, before any weights are read: GPU, mode, template,
    settings exllamav2 would crash or hang on, VRAM."""
    if settings.model_dir is None:
        raise EngineConfigError(
            "exllamav2.model_dir is not set (OPSTREAM_ENGINE__EXLLAMAV2__MODEL_DIR)"
        )
    if not settings.model_dir.is_dir():
        raise EngineConfigError(f"exllamav2.model_dir {settings.model_dir} is not a directory")
    template = load_chat_template(settings.model_dir)
    shape, weights = read_model_dir(settings.model_dir)
    gpus = probe_gpus()
    flash_attn = probe_flash_attn()
    decision = select_batching_mode(
        settings.batching_mode, gpus, flash_attn.version, flash_attn.problem
    )
    plan = build_vram_plan(settings, shape, weights, decision)
    check_plan(plan)
    reserve = settings.vram_reserve_mb * MIB
    if settings.gpu_split is None:
        available = sum(max(g.free_bytes - reserve, 0) for g in gpus)
    else:
        used = gpus[: len(settings.gpu_split)]
        available = sum(max(g.free_bytes - reserve, 0) for g in used)
    names = ", ".join(f"{g.name} ({g.free_bytes / GIB:.1f} GiB free)" for g in gpus)
    estimate = check_fits(plan, available, device_names=names)
    log.info(
        "exl2_startup",
        extra={
            "mode": decision.mode,
            "reason": decision.reason,
            "estimate_gib": round(estimate.total / GIB, 2),
            "available_gib": round(available / GIB, 2),
        },
    )
    return _Startup(
        settings=settings,
        decision=decision,
        template=template,
        gpus=gpus,
        estimate=estimate,
        flash_attn=flash_attn,
    )


def load_exllamav2_engine(
    settings: ExLlamaV2Settings, *, on_fatal: FatalHandler = exit_process
) -> ExLlamaV2Engine:
    """Check the GPU and VRAM, load the model and start the GPU worker (blocking, minutes).

    Call it off the event loop (e.g. `await asyncio.to_thread(load_exllamav2_engine, s)`).
    Raises EngineConfigError, with what to change, when it cannot run here. `on_fatal` is
    called if the GPU is lost later (default: exit the process with GPU_FATAL_EXIT_CODE).
    """
    worker = _Worker(prepare_startup(settings), on_fatal=on_fatal)
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

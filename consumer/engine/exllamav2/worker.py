"""The one thread that owns the GPU: its inbox, the static and paged batch loops, failures."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from consumer.engine.base import BatchObserver, EngineError
from consumer.engine.exllamav2.batching import QueuedShape, paged_completion, plan_static_batch
from consumer.engine.exllamav2.errors import is_sticky_cuda_error
from consumer.engine.exllamav2.fatal import (
    FatalHandler,
    GpuLost,
    cuda_context_alive,
    exit_process,
)
from consumer.engine.exllamav2.loader import Runtime, load_runtime
from consumer.engine.exllamav2.startup import Startup

log = logging.getLogger("opstream.engine.exllamav2")


class GpuWorker(threading.Thread):
    """The one thread that owns the GPU: loads the model, then schedules all requests.

    Every ticket taken from the inbox is answered exactly once (or dropped when its caller
    cancelled it): a failure fails only the requests it touched, and the thread serves on. A
    sticky CUDA error is the exception: the worker marks itself fatal, calls `on_fatal`
    (default: exit the process) and fails whatever is still open.
    """

    def __init__(
        self,
        start: Startup,
        *,
        load: Callable[[Startup], Runtime] = load_runtime,
        on_fatal: FatalHandler = exit_process,
        context_alive: Callable[[], bool] = cuda_context_alive,
    ) -> None:
        super().__init__(name="exl2-gpu", daemon=True)
        self.startup = start
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.ready: concurrent.futures.Future[Runtime] = concurrent.futures.Future()
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

    def _score(self, runtime: Runtime, ticket: Any) -> None:
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

    def _decode(self, runtime: Runtime) -> Callable[[list[int]], str]:
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

    def _serve_static(self, runtime: Runtime) -> None:
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
        self, runtime: Runtime, waiting: deque[Any], decode: Callable[[list[int]], str]
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

    def _serve_paged(self, runtime: Runtime) -> None:
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

    def _unload(self, runtime: Runtime) -> None:
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

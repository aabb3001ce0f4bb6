"""What exllamav2's two scheduler backends share: encoding, limits, scoring, failures, details.

The scheduler (`consumer.engine.scheduler`) decides what runs; a backend here only runs it, on
the scheduler's thread, which built it and so is the one thread that owns the GPU. The static
backend (`static_backend`) runs padded batches, the paged one (`paged_backend`) exllamav2's
dynamic generator. Both run label scoring on its own small cache, one score job per step,
between decode steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from consumer.engine.base import (
    ChatMessage,
    EngineError,
    Generation,
    GenerationRequest,
    Scores,
    is_out_of_memory,
)
from consumer.engine.exllamav2.errors import is_sticky_cuda_error
from consumer.engine.exllamav2.fatal import cuda_context_alive
from consumer.engine.exllamav2.loader import Runtime
from consumer.engine.exllamav2.runner import ScoreTicket, score_candidates
from consumer.engine.exllamav2.startup import Startup
from consumer.engine.grammar import GrammarCache, GrammarVocabulary, SequenceMatcher
from consumer.engine.scheduler.driver import BackendLost, Job, StepEvent

log = logging.getLogger(__name__)


class Exl2Backend:
    """The parts of an exllamav2 `Backend` (see `consumer.engine.scheduler.driver`) that do
    not depend on the batching mode.

    `can_preempt` is False in both modes: a static row cannot leave a padded batch and come
    back, and the dynamic generator cannot take a job's sampled tokens back cheaply. Work
    already running therefore finishes (or is cancelled); priority and fairness decide what
    starts in the next free slot.
    """

    name = "exllamav2"
    can_preempt = False
    # exllamav2 cuts prompts itself (the dynamic generator's `max_chunk_size`, a padded batch's
    # `max_input_len`), so the scheduler runs without a per-step limit here: its budget always
    # covers what `wants` asks, and a step computes that.
    step_capacity: int | None = None

    def __init__(
        self,
        startup: Startup,
        runtime: Runtime,
        *,
        context_alive: Callable[[], bool] = cuda_context_alive,
    ) -> None:
        settings = startup.settings
        self.startup = startup
        self.runtime = runtime
        self.model = settings.model_name or (
            settings.model_dir.name if settings.model_dir else "exl2"
        )
        self.slots = settings.max_batch_size
        self.end_of_turn_id = runtime.end_of_turn_id
        self._max_seq_len = settings.max_seq_len
        self._score_max_seq_len = settings.score_max_seq_len
        self._context_alive = context_alive
        self._score: Job | None = None  # started; runs at the next step
        self._lost: str | None = None
        self._grammar_cache: GrammarCache | None = None  # see `grammars`
        self._grammar_lock = threading.Lock()

    # -- callers' threads -----------------------------------------------------------------

    def encode_prompt(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        prompt = self.startup.template.render(messages, add_generation_prompt=True)
        with self.runtime.tokenizer_lock:
            ids = self.runtime.tokenizer.encode(prompt, encode_special_tokens=True, add_bos=False)
        return [int(t) for t in ids[0].tolist()]

    def encode_text(self, text: str) -> list[int]:
        with self.runtime.tokenizer_lock:
            ids = self.runtime.tokenizer.encode(text, encode_special_tokens=False, add_bos=False)
        return [int(t) for t in ids[0].tolist()]

    def check_generate(self, prompt_ids: list[int], request: GenerationRequest) -> None:
        if request.max_tokens < 1:
            raise EngineError("max_tokens must be at least 1", retryable=False)
        if len(prompt_ids) + request.max_tokens > self._max_seq_len:
            raise EngineError(
                f"prompt of {len(prompt_ids)} tokens + max_tokens {request.max_tokens} exceeds "
                f"max_seq_len {self._max_seq_len}",
                retryable=False,
            )
        if request.constraint is not None:
            # Compiled (or found cached) on the caller's thread: a refused schema never queues.
            self.grammars().compile(request.constraint)

    def grammars(self) -> GrammarCache:
        """JSON grammars compiled for the model's tokenizer (its tokenizer.json; built at
        first use)."""
        with self._grammar_lock:
            if self._grammar_cache is None:
                model_dir = self.startup.settings.model_dir
                assert model_dir is not None
                vocabulary = GrammarVocabulary.from_tokenizer_json(
                    model_dir / "tokenizer.json",
                    self.runtime.stop_ids,
                    n_vocab=self.runtime.vocab_size,
                )
                self._grammar_cache = GrammarCache(vocabulary)
            return self._grammar_cache

    def matcher_for(self, job: Job) -> SequenceMatcher | None:
        """A generate job's fresh grammar state (None: unconstrained)."""
        request = job.request
        if request is None or request.constraint is None:
            return None
        return self.grammars().matcher(request.constraint)

    def check_score(self, prompt_ids: list[int], candidates: list[list[int]]) -> None:
        """`candidates` end with the end-of-turn token, as the scheduler's engine builds them."""
        longest = max((len(c) for c in candidates), default=0)
        if len(prompt_ids) + longest > self._score_max_seq_len:
            raise EngineError(
                f"prompt of {len(prompt_ids)} tokens + label of {longest} exceeds "
                f"score_max_seq_len {self._score_max_seq_len}",
                retryable=False,
            )

    def details(self) -> dict[str, object]:
        start = self.startup
        details: dict[str, object] = {
            "batching_mode": start.decision.mode,
            "batching_reason": start.decision.reason,
            "cache_mode": start.settings.cache_mode,
            "max_seq_len": self._max_seq_len,
            "max_batch_size": start.settings.max_batch_size,
            "active_sequences": self.active_sequences(),
            "vram_estimate_bytes": start.estimate.as_dict(),
            "exllamav2_version": self.runtime.exllamav2_version,
            "flash_attn_version": start.flash_attn.version,
            "flash_attn_problem": start.flash_attn.problem,
            "grammar_cache": None if self._grammar_cache is None else self._grammar_cache.details(),
        }
        if start.decision.mode == "static":
            details["static_attention"] = start.settings.static_attention
        if self._lost is None:
            # Querying a poisoned CUDA context for memory would only raise again.
            details["gpus"] = self._gpu_state()
        return details

    def active_sequences(self) -> int:
        """Sequences the GPU computes at each step now (read from any thread)."""
        raise NotImplementedError

    def _gpu_state(self) -> list[dict[str, object]]:
        state: list[dict[str, object]] = []
        if not self.startup.gpus:
            return state
        import torch

        for gpu in self.startup.gpus:
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

    # -- the scheduler's thread -----------------------------------------------------------

    def _score_wants(self) -> dict[Job, int]:
        """The score job's tokens: it runs whole (prompt and every label) at the next step."""
        job = self._score
        if job is None:
            return {}
        return {job: len(job.prompt_ids) + sum(len(c) for c in job.candidates)}

    def _score_fits(self, chosen: list[Job]) -> bool:
        """One score job at a time: it runs whole at the next step, between decode steps."""
        return self._score is None and not any(c.kind == "score" for c in chosen)

    def _run_score(self) -> list[StepEvent]:
        job, self._score = self._score, None
        if job is None:
            return []
        runtime = self.runtime
        eot = runtime.end_of_turn_id
        ticket = ScoreTicket(
            prompt_ids=job.prompt_ids,
            # score_candidates adds the end-of-turn token after every label itself.
            candidates=[c[:-1] if c and c[-1] == eot else c for c in job.candidates],
        )
        try:
            logprobs = score_candidates(
                runtime.model,
                runtime.score_cache,
                ticket,
                end_of_turn_id=eot,
                pad_id=runtime.pad_id,
                vocab_size=runtime.vocab_size,
            )
        except Exception as exc:
            return [StepEvent(job, error=self._failure(exc, "exl2_score_failed", 1))]
        scores = Scores(
            logprobs=logprobs,
            input_tokens=len(job.prompt_ids),
            scored_tokens=sum(len(c) + 1 for c in ticket.candidates),
        )
        return [StepEvent(job, result=scores)]

    def _failure(
        self, exc: BaseException, event: str, requests: int, *, rejected: bool = False
    ) -> EngineError:
        """The error to answer the requests `exc` failed with; BackendLost if it cost the GPU.

        `rejected`: exllamav2 refused the request before running it (an assertion on its
        size), so trying again would fail the same way.
        """
        log.error(event, extra={"requests": requests, "error": type(exc).__name__}, exc_info=exc)
        self._check_alive(exc)
        return as_engine_error(exc, rejected=rejected)

    def _check_alive(self, exc: BaseException) -> None:
        """Raise BackendLost when `exc` poisoned the CUDA context (then nothing runs again)."""
        if is_sticky_cuda_error(exc) or not self._context_alive():
            self._lost = f"{type(exc).__name__}: {exc}"
            raise BackendLost(self._lost) from exc

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        import torch

        with self.runtime.tokenizer_lock:
            text = self.runtime.tokenizer.decode(
                torch.tensor(ids, dtype=torch.long), decode_special_tokens=False
            )
        return str(text)

    def _generation(self, job: Job, generation: Generation) -> Generation:
        """`generation` with the time since `job` was submitted (the scheduler adds the rest)."""
        total_ms = (time.perf_counter() - job.submitted_at) * 1000.0
        return Generation(
            text=generation.text,
            finish_reason=generation.finish_reason,
            input_tokens=generation.input_tokens,
            output_tokens=generation.output_tokens,
            timings={**generation.timings, "total_ms": round(total_ms, 3)},
        )

    def close(self) -> None:
        """Unload the model; on a lost GPU leave it (the process is ending, CUDA would raise)."""
        if self._lost is not None:
            return
        import torch

        try:
            if self.runtime.generator is not None:
                self.runtime.generator.clear_queue()
            self.runtime.model.unload()
        finally:
            torch.cuda.empty_cache()


def request_of(job: Job) -> GenerationRequest:
    """A generate job's request (the scheduler's engine always sets it)."""
    if job.request is None:
        raise EngineError("a generate job without a request", retryable=False)
    return job.request


def as_engine_error(exc: BaseException, *, rejected: bool = False) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    if is_out_of_memory(exc):
        return EngineError("GPU out of memory", retryable=True)
    if rejected and isinstance(exc, AssertionError | ValueError | TypeError):
        return EngineError(f"exllamav2 refused the request: {exc}", retryable=False)
    return EngineError(f"GPU step failed: {type(exc).__name__}", retryable=True)

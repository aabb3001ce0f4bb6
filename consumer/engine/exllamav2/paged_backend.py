"""Paged batching under the scheduler: exllamav2's dynamic generator (flash-attn, sm_80+)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from consumer.engine.base import Generation, RequestState
from consumer.engine.exllamav2.backend import Exl2Backend, request_of
from consumer.engine.exllamav2.batching import paged_completion
from consumer.engine.exllamav2.fatal import cuda_context_alive
from consumer.engine.exllamav2.grammar_filter import GrammarFilter
from consumer.engine.exllamav2.loader import Runtime
from consumer.engine.exllamav2.startup import Startup
from consumer.engine.grammar import SequenceMatcher
from consumer.engine.scheduler.driver import Job, StepEvent

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Running:
    """A started job in the generator: PREFILLING until its first token, then GENERATING (it
    leaves `_running` when it ends)."""

    handle: Any  # the ExLlamaV2DynamicJob
    reported: str = ""  # text already returned in a StepEvent
    state: RequestState = RequestState.PREFILLING


class PagedBackend(Exl2Backend):
    """Runs the scheduler's generate jobs as jobs of exllamav2's dynamic generator.

    Continuous batching: the scheduler starts a job whenever the generator has room
    (`max_batch_size` jobs); each step is one `generator.iterate()` (a prefill chunk or one
    token for every job). The generator's own queue holds only jobs waiting for cache pages,
    so the order in which requests start is the policy's. `stop(job)` cancels the job in the
    generator, which frees its pages and slot at once.

    No preemption (`can_preempt` False): resuming would mean enqueueing prompt + sampled ids
    as a new job, which re-runs the prefill and loses the job's held text and sampler state.
    """

    def __init__(
        self,
        startup: Startup,
        runtime: Runtime,
        *,
        context_alive: Callable[[], bool] = cuda_context_alive,
    ) -> None:
        super().__init__(startup, runtime, context_alive=context_alive)
        assert runtime.generator is not None, "paged batching needs the dynamic generator"
        self._generator = runtime.generator
        self._running: dict[Job, _Running] = {}

    def active_sequences(self) -> int:
        return len(self._generator.active_jobs)

    # Capacity counts the scheduler's own jobs, not the generator's lists: a job whose cancel
    # failed may run on in the generator to its end, and it must not hold a slot the scheduler
    # can never free (the generator's own max_batch_size keeps the next job waiting meanwhile,
    # and the steps for that job advance the stray one).

    def live(self) -> int:
        return len(self._running) + (1 if self._score is not None else 0)

    def wants(self) -> dict[Job, int]:
        wanted = {
            job: 1 if running.state is RequestState.GENERATING else len(job.prompt_ids)
            for job, running in self._running.items()
        }
        return {**self._score_wants(), **wanted}

    def free_slots(self) -> int:
        rows = max(self.slots - len(self._running), 0)
        return rows + (1 if self._score is None else 0)

    def fits(self, job: Job, chosen: list[Job]) -> bool:
        if job.kind == "score":
            return self._score_fits(chosen)
        starting = sum(1 for c in chosen if c.kind == "generate")
        return starting < self.slots - len(self._running)

    def start(self, job: Job) -> None:
        if job.kind == "score":
            self._score = job
            return
        try:
            handle = make_paged_job(job, self.runtime.stop_ids, self.matcher_for(job))
            self._generator.enqueue(handle)
        except Exception as exc:
            raise self._failure(exc, "exl2_paged_enqueue_failed", 1, rejected=True) from exc
        self._running[job] = _Running(handle)

    def step(self, budget: Mapping[Job, int]) -> list[StepEvent]:
        """The score job whole, then one `generator.iterate()`: a prefill chunk or one token
        for every job (the budget always covers it: see `Exl2Backend.step_capacity`)."""
        events = self._run_score()
        if not self._running:
            return events
        try:
            results = self._generator.iterate()
        except Exception as exc:
            jobs = list(self._running)
            error = self._failure(exc, "exl2_paged_iterate_failed", len(jobs))
            # The scheduler stops each of them next, which cancels it in the generator.
            return [*events, *(StepEvent(j, error=error) for j in jobs)]
        for result in results:
            job = result.get("identifier")
            if not isinstance(job, Job) or result.get("stage") != "streaming":
                continue
            running = self._running.get(job)
            if running is not None:
                events.append(self._streamed(job, running, result))
        return events

    def _streamed(self, job: Job, running: _Running, result: dict[str, Any]) -> StepEvent:
        """One streaming result: a token was sampled (a stop token is not an output token)."""
        running.state = RequestState.GENERATING
        new_tokens = 0 if result.get("eos_reason") == "stop_token" else 1
        if not result.get("eos"):
            text = str(result.get("text") or "")
            running.reported += text
            return StepEvent(job, new_tokens=new_tokens, text=text)
        del self._running[job]  # the generator released it: nothing to cancel
        done = paged_completion(result, self._decode)
        reported = running.reported
        rest = done.text[len(reported) :] if done.text.startswith(reported) else ""
        generation = Generation(
            text=done.text,
            finish_reason=done.reason,
            input_tokens=len(job.prompt_ids),
            output_tokens=done.output_tokens,
        )
        return StepEvent(
            job, new_tokens=new_tokens, text=rest, result=self._generation(job, generation)
        )

    def stop(self, job: Job, *, preempted: bool = False) -> None:
        if job is self._score:
            self._score = None
            return
        running = self._running.pop(job, None)
        if running is None:
            return  # finished: the generator already released it
        try:
            self._generator.cancel(running.handle)
        except Exception as exc:
            # The job may run on to its own end; its results are ignored.
            log.error("exl2_paged_cancel_failed", extra={"error": type(exc).__name__}, exc_info=exc)
            self._check_alive(exc)


def make_paged_job(
    job: Job, stop_ids: frozenset[int], grammar: SequenceMatcher | None = None
) -> Any:
    """The ExLlamaV2DynamicJob for a generate job (greedy, or temperature + top_p; with a
    `grammar`, masked by it through a `GrammarFilter`)."""
    import torch
    from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

    request = request_of(job)
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
        input_ids=torch.tensor([job.prompt_ids], dtype=torch.long),
        max_new_tokens=request.max_tokens,
        gen_settings=sampler,
        seed=request.seed,
        stop_conditions=[*sorted(stop_ids), *(s for s in request.stop if s)],
        identifier=job,
        filters=[GrammarFilter(grammar)] if grammar is not None else None,
    )

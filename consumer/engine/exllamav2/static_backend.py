"""Static batching under the scheduler: padded batches on GPUs without flash-attn (a T4)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from consumer.engine.base import RequestState
from consumer.engine.exllamav2.backend import Exl2Backend, request_of
from consumer.engine.exllamav2.batching import QueuedShape, plan_static_batch
from consumer.engine.exllamav2.fatal import cuda_context_alive
from consumer.engine.exllamav2.loader import Runtime
from consumer.engine.exllamav2.runner import GenTicket, StaticBatch
from consumer.engine.exllamav2.startup import Startup
from consumer.engine.scheduler.driver import Job, StepEvent


class StaticBackend(Exl2Backend):
    """Runs the scheduler's generate jobs as padded batches on one (batch x max_seq_len) cache.

    A padded batch has a fixed shape: rows join only before it starts. While no batch runs,
    the scheduler may start up to `max_batch_size` generate jobs whose padded shape (longest
    prompt + largest max_tokens) fits `max_seq_len`; they are prefilled together at the next
    step. While a batch runs, only score jobs start. The policy therefore decides which
    requests form the next batch (fairness between tenants, interactive before batch,
    deadlines), never what leaves a running one.

    `stop(job)` for a running row (cancelled, or its caller went away) stops it at once: it
    samples no more tokens and reports nothing. Its row still rides in every forward pass,
    fed padding, and its slot frees only when the padded batch ends (when every other row has
    finished or been stopped too).
    """

    def __init__(
        self,
        startup: Startup,
        runtime: Runtime,
        *,
        context_alive: Callable[[], bool] = cuda_context_alive,
    ) -> None:
        super().__init__(startup, runtime, context_alive=context_alive)
        self._forming: list[Job] = []  # PREFILLING: started, prefilled together at the next step
        self._batch: StaticBatch | None = None
        self._rows: list[Job] = []  # the running batch's jobs, by row

    def active_sequences(self) -> int:
        batch = self._batch
        return 0 if batch is None else batch.size

    def live(self) -> int:
        batch = self._batch
        rows = 0 if batch is None else sum(1 for row in batch.rows if not row.done)
        return len(self._forming) + rows + (1 if self._score is not None else 0)

    def wants(self) -> dict[Job, int]:
        wanted = {job: len(job.prompt_ids) for job in self._forming}
        if self._batch is not None:
            rows = zip(self._rows, self._batch.rows, strict=True)
            wanted.update((job, 1) for job, row in rows if row.state is RequestState.GENERATING)
        return {**self._score_wants(), **wanted}

    def free_slots(self) -> int:
        rows = 0 if self._batch is not None else self.slots - len(self._forming)
        return rows + (1 if self._score is None else 0)

    def fits(self, job: Job, chosen: list[Job]) -> bool:
        if job.kind == "score":
            return self._score_fits(chosen)
        if self._batch is not None:
            return False
        rows = [*self._forming, *(c for c in chosen if c.kind == "generate"), job]
        shapes = [QueuedShape(len(r.prompt_ids), r.max_tokens) for r in rows]
        planned = plan_static_batch(
            shapes, max_batch_size=self.slots, max_seq_len=self._max_seq_len
        )
        return len(planned) == len(rows)

    def start(self, job: Job) -> None:
        if job.kind == "score":
            self._score = job
        else:
            self._forming.append(job)

    def step(self, budget: Mapping[Job, int]) -> list[StepEvent]:
        """The score job whole, the forming batch's prefill, one token for every row (the
        budget always covers it: see `Exl2Backend.step_capacity`)."""
        events = self._run_score()
        if self._batch is None and self._forming:
            events += self._begin_batch()
        if self._batch is not None:
            events += self._decode_step()
        return events

    def stop(self, job: Job, *, preempted: bool = False) -> None:
        if job is self._score:
            self._score = None
        elif job in self._forming:
            self._forming.remove(job)
        elif self._batch is not None and job in self._rows:
            index = self._rows.index(job)
            if not self._batch.rows[index].done:
                text = self._batch.drop(index)
                if job.on_text is None:
                    # The scheduler answers a cancelled job with `job.text` after this call; a
                    # row that did not stream its text reports what it had generated.
                    job.text = text
            if self._batch.finished:
                self._batch, self._rows = None, []

    def _begin_batch(self) -> list[StepEvent]:
        jobs, self._forming = self._forming, []
        runtime = self.runtime
        try:
            tickets = [
                GenTicket(
                    ids=j.prompt_ids,
                    request=request_of(j),
                    stream=j.on_text is not None,
                    grammar=self.matcher_for(j),
                )
                for j in jobs
            ]
            batch = StaticBatch(
                runtime.model,
                runtime.gen_cache,
                tickets,
                pad_id=runtime.pad_id,
                stop_ids=runtime.stop_ids,
                decode=self._decode,
                vocab_size=runtime.vocab_size,
            )
            batch.prefill()
        except Exception as exc:
            error = self._failure(exc, "exl2_static_prefill_failed", len(jobs))
            return [StepEvent(j, error=error) for j in jobs]
        self._batch, self._rows = batch, jobs
        return []

    def _decode_step(self) -> list[StepEvent]:
        batch = self._batch
        assert batch is not None
        try:
            steps = batch.step()
        except Exception as exc:
            live = [j for j, row in zip(self._rows, batch.rows, strict=True) if not row.done]
            self._batch, self._rows = None, []
            error = self._failure(exc, "exl2_static_step_failed", len(live))
            return [StepEvent(j, error=error) for j in live]
        events = []
        for step in steps:
            job = self._rows[step.index]
            result = None if step.result is None else self._generation(job, step.result)
            events.append(StepEvent(job, new_tokens=step.new_tokens, text=step.text, result=result))
        if batch.finished:
            self._batch, self._rows = None, []
        return events

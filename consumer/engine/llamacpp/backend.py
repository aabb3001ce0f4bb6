"""The CPU backend: a GGUF model run by llama.cpp, every running request in one decode per step.

The scheduler (`consumer.engine.scheduler`) decides what runs and how many tokens each job
computes per step (its budget); this backend runs it. Each running job owns one sequence of a
llama.cpp context (a slot) and has an explicit state (`RequestState`: prefilling, generating,
scoring, paused, done), as llama.cpp server's slots do. Every `step` is one `llama_decode`
over one batch: first the next token of every generating sequence, then the prompt chunks
(chunked prefill) and scoring candidates the budget gives. Logits are read only where needed:
every generated token, the last token of a finished prompt, every token of a scored candidate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, Protocol

from consumer.engine.base import (
    ChatMessage,
    EngineError,
    FinishReason,
    Generation,
    GenerationRequest,
    RequestState,
    Scores,
)
from consumer.engine.chat_template import ChatTemplate, ChatTemplateError, end_of_turn_token
from consumer.engine.grammar import GrammarCache, GrammarVocabulary
from consumer.engine.llamacpp.native import Context, Model, Token
from consumer.engine.llamacpp.sampling import Sampler, derive_seed, token_logprob
from consumer.engine.llamacpp.text import TextStream
from consumer.engine.llamacpp.threads import ThreadTuner, thread_choices
from consumer.engine.scheduler.driver import Job, SlotUnavailable, StepEvent

log = logging.getLogger(__name__)


class GgufVocabulary(Protocol):
    """What `gguf_chat_template` reads of a loaded GGUF (`native.Model`)."""

    bos: int
    eos: int

    def metadata(self, key: str) -> str | None: ...

    def token_text(self, token: int) -> str: ...

    def end_of_generation_tokens(self) -> list[int]: ...

    def single_token(self, text: str) -> int | None: ...


def gguf_chat_template(model: GgufVocabulary, name: str) -> tuple[ChatTemplate, int]:
    """The GGUF's chat template (`tokenizer.chat_template`) and the id of the token that ends
    an assistant turn in it (see `chat_template.end_of_turn_token`)."""
    source = model.metadata("tokenizer.chat_template")
    if not source:
        raise EngineError(f"{name} has no chat template", retryable=False)
    template = ChatTemplate(
        source=source,
        bos_token=model.token_text(model.bos) if model.bos >= 0 else "",
        eos_token=model.token_text(model.eos) if model.eos >= 0 else "",
        # What may close a turn: the tokens llama.cpp ends generation at.
        added_tokens=tuple(model.token_text(t) for t in model.end_of_generation_tokens()),
    )
    return template, end_of_turn_token(template, model.single_token, fallback=model.eos)


@dataclass(eq=False)
class _Generating:
    """A generate job's progress and state (its `backend_state`; it survives a preemption)."""

    sampler: Sampler
    text: TextStream
    started_at: float
    generated: list[int] = field(default_factory=list)  # the last one is not decoded yet
    first_token_at: float | None = None
    state: RequestState = RequestState.PREFILLING


@dataclass(eq=False)
class _Scoring:
    """A score job's progress and state (its `backend_state`; finished candidates survive a
    preemption)."""

    logprobs: list[float] = field(default_factory=list)  # one per finished candidate
    first: list[float] = field(default_factory=list)  # each candidate's first-token logprob
    total: float = 0.0  # the current candidate's sum so far
    cursor: int = 0  # how many of the current candidate's tokens are decoded
    state: RequestState = RequestState.PREFILLING


@dataclass(eq=False)
class _Sequence:
    """A running job in its slot."""

    job: Job
    seq: int  # the llama.cpp sequence id (the slot)
    feed: list[int]  # what must be in the KV cache before it generates or scores
    progress: _Generating | _Scoring
    fed: int = 0  # how much of `feed` is in the KV cache

    @property
    def state(self) -> RequestState:
        return self.progress.state

    @state.setter
    def state(self, state: RequestState) -> None:
        self.progress.state = state

    def wanted(self) -> int:
        """Tokens it asks to compute at the next step (see `Backend.wants`)."""
        if self.state is RequestState.PREFILLING:
            return len(self.feed) - self.fed
        if self.state is RequestState.GENERATING:
            return 1
        if isinstance(self.progress, _Scoring) and self.state is RequestState.SCORING:
            # One candidate at a time; its last token (the end of turn) is only predicted.
            body = len(self.job.candidates[len(self.progress.logprobs)]) - 1
            return body - self.progress.cursor
        return 0

    def cached(self) -> list[int]:
        """Tokens whose cells it holds from position 0 on (candidates' cells are dropped
        after each is scored; a generation's last sampled token is not decoded yet)."""
        if self.fed < len(self.feed) or isinstance(self.progress, _Scoring):
            return self.feed[: self.fed]
        return [*self.job.prompt_ids, *self.progress.generated[:-1]]


@dataclass(eq=False)
class _Batch:
    """One step's tokens, and which logits rows belong to whom."""

    tokens: list[Token] = field(default_factory=list)
    generating: list[tuple[_Sequence, int]] = field(default_factory=list)  # its next-token row
    prompts: list[tuple[_Sequence, int, int | None]] = field(default_factory=list)  # fed, row
    candidates: list[tuple[_Sequence, int, int]] = field(default_factory=list)  # first row, rows


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class LlamaCppBackend:
    """A GGUF model on the CPU with `slots` sequences advanced together, one token per step.

    `n_ctx` is what one sequence (one request) may use; the context holds `slots` of them.
    `flash_attn` (on by default) makes a sequence's logits independent of what runs beside it
    and batching pay; off, the logits equal llama-cpp-python's `Llama` (which runs without
    it) but a batch of 8 is slower than 8 one after another (measured, SmolLM2-135M).
    """

    name = "llamacpp"
    can_preempt = True

    def __init__(
        self,
        model_path: Path,
        *,
        slots: int = 4,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 512,
        seed: int = 0,
        repack_weights: bool = False,
        flash_attn: bool = True,
        spare_sequences: int | None = None,
    ) -> None:
        """How many prompt tokens a step takes is the scheduler's budget (`step`), within
        `n_batch` (`step_capacity`)."""
        if slots < 1:
            raise ValueError("slots must be at least 1")
        if n_batch < slots:
            raise ValueError(f"n_batch ({n_batch}) must be at least slots ({slots})")
        started = time.perf_counter()
        self.model = model_path.stem
        self.slots = slots
        # Sequences beyond the slots: a paused job's cells stay in its own sequence while the
        # work that displaced it runs in a spare one, so resuming it computes nothing again
        # (what makes fair-share pauses cheap). Each costs one sequence's KV cache.
        spare = max(1, slots // 4) if spare_sequences is None else spare_sequences
        self.step_capacity = n_batch
        self.n_ctx = n_ctx
        self._seed = seed
        self._jobs = count()
        self._closed = False
        self._model = Model(model_path, repack_weights=repack_weights)
        try:
            # The token that ends an assistant turn: generation stops at it, label scoring
            # scores it after every label.
            self._template, self.end_of_turn_id = gguf_chat_template(self._model, model_path.name)
            self._context = Context(
                self._model,
                n_ctx=n_ctx,
                n_seq=slots + spare,
                n_batch=n_batch,
                n_threads=n_threads,
                flash_attn=flash_attn,
            )
        except BaseException:
            self._model.close()
            raise
        self._free = list(range(slots + spare))  # sequences, not slots: see `spare`
        self._running: dict[Job, _Sequence] = {}  # in start order
        # Per slot: the tokens its cells hold from position 0 (a prefix of what is there).
        self._cached: list[list[int]] = [[] for _ in range(slots + spare)]
        self._paused: set[int] = set()  # sequences whose cells a paused job will resume from
        self.reused_tokens = 0  # prompt tokens not computed again thanks to a slot's cache
        self._grammar_cache: GrammarCache | None = None  # see `grammars`
        self._grammar_lock = threading.Lock()
        # Unset n_threads: the count that measures fastest on this (maybe shared) CPU.
        self._threads = ThreadTuner(
            (n_threads,) if n_threads else thread_choices(self._context.threads)
        )
        log.info(
            "engine_loaded",
            extra={
                "backend": self.name,
                "model": self.model,
                "slots": slots,
                "n_ctx": n_ctx,
                "load_s": round(time.perf_counter() - started, 3),
            },
        )

    # -- any thread ---------------------------------------------------------------------

    def encode_prompt(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        """The conversation rendered with the model's chat template (and its generation
        prompt), special tokens parsed."""
        self._check_open()
        try:
            rendered = self._template.render(messages, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise EngineError(str(exc), retryable=False) from exc
        return self._model.tokenize(rendered, special=True)

    def encode_text(self, text: str) -> list[int]:
        """Plain text: no special tokens parsed, no BOS."""
        self._check_open()
        return self._model.tokenize(text, special=False)

    def check_generate(self, prompt_ids: list[int], request: GenerationRequest) -> None:
        if request.max_tokens < 1:
            raise EngineError("max_tokens must be at least 1", retryable=False)
        # A prompt needs room for one token; a budget beyond the window ends at the window
        # ("length"), as llama.cpp's own completion does.
        self._check_fits(prompt_ids, 1, "one generated token")
        if request.constraint is not None:
            # Compiled (or found cached) here, on the caller's thread: a schema the grammar
            # engine refuses never queues.
            self.grammars().compile(request.constraint)

    def grammars(self) -> GrammarCache:
        """JSON grammars compiled for this model's vocabulary (built at first use, ~0.4 s)."""
        with self._grammar_lock:
            if self._grammar_cache is None:
                stops = {*self._model.end_of_generation_tokens(), self.end_of_turn_id}
                vocabulary = GrammarVocabulary.from_llamacpp_model(self._model.handle, stops)
                self._grammar_cache = GrammarCache(vocabulary)
            return self._grammar_cache

    def check_score(self, prompt_ids: list[int], candidates: list[list[int]]) -> None:
        if not candidates:
            raise EngineError("no candidates to score", retryable=False)
        if any(not tokens for tokens in candidates):
            raise EngineError("a candidate has no tokens", retryable=False)
        self._check_fits(prompt_ids, max(len(c) for c in candidates), "the longest candidate")

    def details(self) -> dict[str, object]:
        return {
            "n_ctx": self.n_ctx,
            "slots": self.slots,
            "sequences": len(self._cached),
            "device": "cpu",
            "flash_attn": self._context.flash_attn,
            "threads": self._threads.current,
            "reused_prompt_tokens": self.reused_tokens,
            "thread_choices": list(self._threads.choices),
            "grammar_cache": None if self._grammar_cache is None else self._grammar_cache.details(),
        }

    # -- the scheduler's thread ---------------------------------------------------------

    def free_slots(self) -> int:
        return min(len(self._free), self.slots - len(self._running))

    def fits(self, job: Job, chosen: list[Job]) -> bool:
        # Every job fits any slot (check_* refused those longer than a slot's context); how
        # many slots are free is the scheduler's count.
        return True

    def live(self) -> int:
        return sum(1 for s in self._running.values() if s.state is not RequestState.DONE)

    def wants(self) -> dict[Job, int]:
        return {job: s.wanted() for job, s in self._running.items() if s.wanted() > 0}

    def start(self, job: Job) -> None:
        """Take the free slot whose cache shares the longest prefix with the job's tokens
        (llama-server's slot choice): that prefix is not computed again — a chat template's
        system prompt, a repeated prompt, or all of a paused request resumed in its slot."""
        if job in self._running:
            raise EngineError("the job is running already", retryable=False)
        if not self.free_slots():
            raise SlotUnavailable(f"no free slot ({len(self._running)} of {self.slots} held)")
        if job.kind == "generate":
            generating = self._resume_generating(job)
            feed = [*job.prompt_ids, *generating.generated[:-1]]
            progress: _Generating | _Scoring = generating
            # A fresh generation or a score needs the logits of its last fed token; a resumed
            # generation has its next token sampled already.
            reusable = len(feed) if generating.generated else len(feed) - 1
        else:
            scoring = job.backend_state if isinstance(job.backend_state, _Scoring) else _Scoring()
            scoring.total, scoring.cursor = 0.0, 0
            feed, progress, reusable = list(job.prompt_ids), scoring, len(job.prompt_ids) - 1
        # Longest shared prefix first; on a tie, a sequence no paused job waits to resume in.
        seq, cached = max(
            ((seq, _common_prefix(self._cached[seq], feed)) for seq in self._free),
            key=lambda found: (found[1], found[0] not in self._paused, -found[0]),
        )
        self._paused.discard(seq)
        cached = min(cached, reusable)
        # Cells from the first position that differs on (all of them for a dirty slot).
        self._context.forget(seq, cached)
        self._free.remove(seq)
        self._cached[seq] = feed[:cached]
        self.reused_tokens += cached
        job.resumed_prefill = len(feed) - cached
        sequence = _Sequence(job, seq, feed, progress, fed=cached)
        # A resumed generation whose every cell survived samples its next token at once.
        sequence.state = RequestState.GENERATING if cached == len(feed) else RequestState.PREFILLING
        job.backend_state = progress
        self._running[job] = sequence

    def step(self, budget: Mapping[Job, int]) -> list[StepEvent]:
        """Compute what `budget` (the scheduler's) gives each job: a generating job's next
        token, a prefilling job's next prompt chunk, a scoring job's next label tokens."""
        batch = self._plan(budget)
        if batch.tokens:
            started = time.perf_counter()
            self._context.decode(batch.tokens)
            threads = self._threads.observe(time.perf_counter() - started, len(batch.tokens))
            self._context.set_threads(threads)
        events: list[StepEvent] = []
        for s, row in batch.generating:
            self._collect(events, s, self._take_token, row)
        for s, fed, last_row in batch.prompts:
            s.fed = fed
            if fed == len(s.feed):
                s.state = (
                    RequestState.GENERATING if s.job.kind == "generate" else RequestState.SCORING
                )
            if last_row is not None:
                self._collect(events, s, self._finish_prompt, last_row)
        for s, first_row, rows in batch.candidates:
            self._collect(events, s, self._take_candidate_rows, first_row, rows)
        return events

    def stop(self, job: Job, *, preempted: bool = False) -> None:
        sequence = self._running.pop(job, None)
        if sequence is None:
            return
        # Its cells stay for the next job that shares a prefix with them (see `start`).
        self._cached[sequence.seq] = sequence.cached()
        self._free.append(sequence.seq)
        if preempted:
            sequence.state = RequestState.PAUSED
            self._paused.add(sequence.seq)
        else:
            sequence.state = RequestState.DONE
            job.backend_state = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._running.clear()
        try:
            self._context.close()
        finally:
            self._model.close()

    # -- internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("engine is closed", retryable=True)

    def _check_fits(self, prompt_ids: list[int], extra: int, what: str) -> None:
        if not prompt_ids:
            raise EngineError("the prompt has no tokens", retryable=False)
        if len(prompt_ids) + extra > self.n_ctx:
            raise EngineError(
                f"prompt of {len(prompt_ids)} tokens plus {what} ({extra} tokens) exceeds the "
                f"context window of {self.n_ctx} tokens",
                retryable=False,
            )

    def _plan(self, budget: Mapping[Job, int]) -> _Batch:
        """This step's batch, as `budget` says: every generating sequence's next token first,
        then prompt chunks and candidate tokens in start order."""
        live = [s for s in self._running.values() if budget.get(s.job, 0) > 0]
        batch = _Batch()
        # In slot order: a batch whose sequences come in the same order as the last one's
        # reuses llama.cpp's graph; another order costs ~1.5x the decode (measured, 8 seqs).
        for s in sorted(live, key=lambda s: s.seq):
            if s.state is RequestState.GENERATING:
                assert isinstance(s.progress, _Generating)
                position = len(s.job.prompt_ids) + len(s.progress.generated) - 1
                batch.generating.append((s, len(batch.tokens)))
                batch.tokens.append(Token(s.progress.generated[-1], position, s.seq, True))
        for s in live:
            take = min(budget[s.job], s.wanted())
            if s.state is RequestState.PREFILLING:
                end = s.fed + take
                # A finished prompt's last logits: the first token, or every candidate's first
                # (a resumed generation has its next token already).
                wants_row = end == len(s.feed) and (
                    isinstance(s.progress, _Scoring) or not s.progress.generated
                )
                for position in range(s.fed, end):
                    row = wants_row and position == end - 1
                    batch.tokens.append(Token(s.feed[position], position, s.seq, row))
                batch.prompts.append((s, end, len(batch.tokens) - 1 if wants_row else None))
            elif s.state is RequestState.SCORING:
                assert isinstance(s.progress, _Scoring)
                # One candidate at a time after the prompt, every token's logits read; the
                # candidate's last token (the end of turn) is only predicted, never decoded.
                body = s.job.candidates[len(s.progress.logprobs)][:-1]
                cursor = s.progress.cursor
                batch.candidates.append((s, len(batch.tokens), take))
                offset = len(s.job.prompt_ids)
                for i in range(cursor, cursor + take):
                    batch.tokens.append(Token(body[i], offset + i, s.seq, True))
        if len(batch.tokens) > self._context.capacity:
            raise EngineError(
                f"the step's budget ({len(batch.tokens)} tokens) exceeds n_batch "
                f"({self._context.capacity})",
                retryable=True,
            )
        return batch

    def _resume_generating(self, job: Job) -> _Generating:
        if isinstance(job.backend_state, _Generating):
            return job.backend_state
        request = job.request
        if request is None:
            raise EngineError("a generate job without a request", retryable=False)
        seed = request.seed
        if seed is None:
            seed = derive_seed(self._seed, next(self._jobs))
        return _Generating(
            sampler=Sampler(
                temperature=request.temperature,
                top_p=request.top_p,
                seed=seed,
                grammar=(
                    None
                    if request.constraint is None
                    else self.grammars().matcher(request.constraint)
                ),
            ),
            text=TextStream(request.stop),
            started_at=time.perf_counter(),
        )

    def _collect(self, events: list[StepEvent], s: _Sequence, handle: Any, *args: Any) -> None:
        """Run one sequence's share of the step's results; its failure is its own."""
        try:
            event = handle(s, *args)
        except Exception as exc:
            log.exception("sequence_failed", extra={"kind": s.job.kind})
            event = StepEvent(
                s.job, error=EngineError(f"llama.cpp failed: {type(exc).__name__}", retryable=True)
            )
        if event is not None:
            if event.result is not None or event.error is not None:
                s.state = RequestState.DONE
            events.append(event)

    def _finish_prompt(self, s: _Sequence, row: int) -> StepEvent | None:
        progress = s.progress
        if isinstance(progress, _Generating):
            return self._take_token(s, row)
        # The prompt's last logits predict every candidate's first token.
        logits = self._context.logits(row)
        progress.first = [token_logprob(logits, c[0]) for c in s.job.candidates]
        if len(progress.logprobs) < len(progress.first):
            progress.total = progress.first[len(progress.logprobs)]
        return self._settle_candidates(s)

    def _take_token(self, s: _Sequence, row: int) -> StepEvent:
        state = s.progress
        request = s.job.request
        assert isinstance(state, _Generating) and request is not None
        token = state.sampler(self._context.logits(row))
        if state.first_token_at is None:
            state.first_token_at = time.perf_counter()
        if self._model.is_end_of_generation(token) or token == self.end_of_turn_id:
            # Not counted, like llama-cpp-python's completion_tokens.
            return StepEvent(s.job, text=state.text.finish(), result=self._generation(s, "stop"))
        state.generated.append(token)
        text = state.text.feed(self._model.piece(token))
        finish: FinishReason | None = None
        if state.text.stopped:
            finish = "stop"
        elif state.sampler.complete:  # the JSON its grammar asks for is whole
            text += state.text.finish()
            finish = "stop"
        elif (
            len(state.generated) >= request.max_tokens
            or len(s.job.prompt_ids) + len(state.generated) >= self.n_ctx
        ):
            text += state.text.finish()
            finish = "length"
        result = self._generation(s, finish) if finish is not None else None
        return StepEvent(s.job, new_tokens=1, text=text, result=result)

    def _generation(self, s: _Sequence, finish: FinishReason) -> Generation:
        state = s.progress
        assert isinstance(state, _Generating)
        first = state.first_token_at
        return Generation(
            text=state.text.text,
            finish_reason=finish,
            input_tokens=len(s.job.prompt_ids),
            output_tokens=len(state.generated),
            first_token_ms=(first - state.started_at) * 1000 if first is not None else None,
        )

    def _take_candidate_rows(self, s: _Sequence, first_row: int, rows: int) -> StepEvent | None:
        state = s.progress
        assert isinstance(state, _Scoring)
        candidate = s.job.candidates[len(state.logprobs)]
        for i in range(rows):
            # The row of candidate token k predicts token k + 1.
            following = candidate[state.cursor + i + 1]
            state.total += token_logprob(self._context.logits(first_row + i), following)
        state.cursor += rows
        return self._settle_candidates(s)

    def _settle_candidates(self, s: _Sequence) -> StepEvent | None:
        """Record the candidates whose every token is scored; the result once all are."""
        state = s.progress
        assert isinstance(state, _Scoring)
        candidates = s.job.candidates
        scored = 0
        while len(state.logprobs) < len(candidates):
            index = len(state.logprobs)
            if state.cursor < len(candidates[index]) - 1:
                break
            state.logprobs.append(state.total)
            scored += len(candidates[index])
            if state.cursor:
                self._context.forget(s.seq, len(s.job.prompt_ids))
            state.cursor = 0
            if index + 1 < len(candidates):
                state.total = state.first[index + 1]
        if len(state.logprobs) == len(candidates):
            result = Scores(
                logprobs=tuple(state.logprobs),
                input_tokens=len(s.job.prompt_ids),
                scored_tokens=sum(len(c) for c in candidates),
            )
            return StepEvent(s.job, new_tokens=scored, result=result)
        return StepEvent(s.job, new_tokens=scored) if scored else None

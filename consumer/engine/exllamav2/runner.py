"""GPU-side work units: a static (padded, masked) batch and prefix-shared label scoring.

Written against exllamav2's model/cache API (`model.forward(ids, cache, input_mask=...,
position_offsets=..., preprocess_only=..., last_id_only=...)`, `cache.current_seq_len`,
`cache.all_tensors()`), duck-typed so the bookkeeping can be tested without a GPU.
Runs only on the scheduler's thread, which owns the GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from consumer.engine.base import FinishReason, Generation, GenerationRequest, RequestState
from consumer.engine.exllamav2.batching import (
    chunks,
    find_stop,
    left_pad,
    plan_scoring,
    streamable,
    sum_candidate_logprobs,
)
from consumer.engine.exllamav2.sampling import RowSampling, mask_padded_vocab, sample_rows
from consumer.engine.grammar import SequenceMatcher


@dataclass(eq=False)
class GenTicket:
    """A generate request as a static batch row sees it: its prompt ids and its settings."""

    ids: list[int]
    request: GenerationRequest
    # Report text as it is generated (held back while it may begin a stop string or ends in
    # half a character); otherwise a row's text is decoded once, when it ends.
    stream: bool = False
    grammar: SequenceMatcher | None = None  # JSON output: the row's own grammar state


@dataclass(eq=False)
class ScoreTicket:
    """A score request: prompt ids and each candidate's ids (without the end-of-turn token)."""

    prompt_ids: list[int]
    candidates: list[list[int]]


@dataclass(frozen=True, slots=True)
class RowStep:
    """What one decode step did for one row of a static batch."""

    index: int
    new_tokens: int  # 0 or 1: a stop token is not an output token
    text: str  # text not reported before (all of it at the end for a row that does not stream)
    result: Generation | None = None  # set in the step the row ended


@dataclass(eq=False)
class _Row:
    ticket: GenTicket
    sampling: RowSampling
    tokens: list[int] = field(default_factory=list)
    # Prefilled with its batch before its first step; DONE once ended or dropped (it rides on,
    # fed padding, until the batch ends).
    state: RequestState = RequestState.GENERATING
    reason: FinishReason = "length"
    text: str = ""
    reported: str = ""  # the prefix of the text already returned in a RowStep
    result: Generation | None = None

    @property
    def done(self) -> bool:
        return self.state is RequestState.DONE

    def end(self, reason: FinishReason) -> None:
        self.state, self.reason = RequestState.DONE, reason


class StaticBatch:
    """Requests decoded in lockstep in one padded batch sharing a (batch x max_seq_len) cache.

    Prompts are left-padded to a common width; an additive mask hides the padding and RoPE
    position offsets start every row's real tokens at position 0, so each row computes what
    it would alone. Rows that finish (or are dropped) early ride along, fed padding, their
    output ignored, until the last row finishes: a padded batch has a fixed shape.
    """

    def __init__(
        self,
        model: Any,
        cache: Any,
        tickets: Sequence[GenTicket],
        *,
        pad_id: int,
        stop_ids: frozenset[int],
        decode: Callable[[list[int]], str],
        vocab_size: int | None = None,
    ) -> None:
        self._model = model
        self._cache = cache
        self._stop_ids = stop_ids
        self._decode = decode
        self._pad_id = pad_id
        self._vocab_size = vocab_size
        padded = left_pad([t.ids for t in tickets], pad_id)
        longest = max(t.request.max_tokens for t in tickets)
        if padded.width + longest > cache.max_seq_len:
            raise ValueError("static batch does not fit a cache row")
        self.rows = [
            _Row(
                ticket=t,
                sampling=RowSampling(
                    temperature=t.request.temperature,
                    top_p=t.request.top_p,
                    seed=t.request.seed,
                    grammar=t.grammar,
                ),
            )
            for t in tickets
        ]
        self._ids = torch.tensor(padded.ids, dtype=torch.long)
        self._mask = torch.tensor(padded.attention_bias(), dtype=torch.float16)
        self._offsets = torch.tensor(padded.position_offsets, dtype=torch.int)
        self._next: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def finished(self) -> bool:
        return all(r.done for r in self.rows)

    def prefill(self) -> None:
        """Ingest all prompts but the last column into the cache."""
        self._cache.current_seq_len = 0
        if self._ids.shape[-1] > 1:
            self._model.forward(
                self._ids[:, :-1],
                self._cache,
                input_mask=self._mask,
                preprocess_only=True,
                position_offsets=self._offsets,
            )
        self._next = self._ids[:, -1:]

    def step(self) -> list[RowStep]:
        """One forward pass: sample one token for every row still running."""
        assert self._next is not None, "prefill() first"
        logits = self._model.forward(
            self._next, self._cache, input_mask=self._mask, position_offsets=self._offsets
        )
        last = logits[:, -1, :].float()
        tokens = sample_rows(last, [r.sampling for r in self.rows], self._vocab_size)
        steps: list[RowStep] = []
        for index, (row, token) in enumerate(zip(self.rows, tokens, strict=True)):
            if not row.done:
                steps.append(self._advance(index, row, token))
        feed = [self._pad_id if r.done else t for r, t in zip(self.rows, tokens, strict=True)]
        self._next = torch.tensor(feed, dtype=torch.long).view(-1, 1)
        return steps

    def drop(self, index: int) -> str:
        """Stop row `index` (cancelled): it samples no more tokens and reports no result, but
        keeps its place, fed padding, until the batch ends. Returns its text so far."""
        row = self.rows[index]
        if not row.done:
            row.state = RequestState.DONE
            row.text = self._decode(row.tokens)
        return row.text

    def _advance(self, index: int, row: _Row, token: int) -> RowStep:
        request = row.ticket.request
        text: str | None = None
        if token in self._stop_ids:
            row.end("stop")
        else:
            row.tokens.append(token)
            if row.sampling.grammar is not None:
                row.sampling.grammar.advance(token)
            if request.stop or row.ticket.stream:
                text = self._decode(row.tokens)
                cut = find_stop(text, request.stop)
                if cut is not None:
                    row.end("stop")
                    text = text[:cut]
            if not row.done and row.sampling.grammar is not None and row.sampling.grammar.complete:
                row.end("stop")  # the JSON its grammar asks for is whole
            if not row.done and len(row.tokens) >= request.max_tokens:
                row.end("length")
        new_tokens = 0 if token in self._stop_ids else 1
        if row.done:
            row.text = self._decode(row.tokens) if text is None else text
            row.result = Generation(
                text=row.text,
                finish_reason=row.reason,
                input_tokens=len(row.ticket.ids),
                output_tokens=len(row.tokens),
            )
            return RowStep(index, new_tokens, _unreported(row, row.text), row.result)
        if text is None:
            return RowStep(index, new_tokens, "")
        return RowStep(index, new_tokens, _unreported(row, text[: streamable(text, request.stop)]))

    def results(self) -> list[tuple[GenTicket, Generation]]:
        """Outcomes of the rows that ended on their own (not dropped), in row order."""
        return [(r.ticket, r.result) for r in self.rows if r.result is not None]


def _unreported(row: _Row, text: str) -> str:
    """What of `text` was not reported yet, and note it as reported.

    Decoding a longer sequence can rewrite the tail of what decoded before (half a character
    completed); text that no longer extends what was reported is not reported twice.
    """
    if not text.startswith(row.reported):
        return ""
    new = text[len(row.reported) :]
    row.reported = text
    return new


def _copy_prefix_rows(cache: Any, rows: int, length: int) -> None:
    """Copy cache row 0's first `length` positions into rows 1..rows-1 (all layers, K and V)."""
    if rows <= 1 or length <= 0:
        return
    # Quantized caches pack some models' K/V in blocks of q_block tokens; copy whole blocks.
    block = max(int(getattr(cache, "q_block", 0) or 1), 1)
    length = min(-(-length // block) * block, cache.max_seq_len)
    for tensor in cache.all_tensors():
        source = tensor[0:1, :length]
        tensor[1:rows, :length].copy_(source.expand(rows - 1, *source.shape[1:]))


def score_candidates(
    model: Any,
    cache: Any,
    ticket: ScoreTicket,
    *,
    end_of_turn_id: int,
    pad_id: int,
    vocab_size: int | None = None,
) -> tuple[float, ...]:
    """Summed logprobs of each candidate + end-of-turn after the prompt, prompt computed once.

    Probabilities are normalised over the tokenizer's `vocab_size` ids, as sampling sees them.
    """
    plan = plan_scoring(ticket.prompt_ids, ticket.candidates, end_of_turn_id)
    prefix = len(plan.prompt_ids)
    longest = max([0, *plan.input_lengths])
    if prefix + longest > cache.max_seq_len:
        raise ValueError("prompt + candidate longer than the scoring cache")

    cache.current_seq_len = 0
    prompt = torch.tensor([plan.prompt_ids], dtype=torch.long)
    last = model.forward(prompt, cache, last_id_only=True)[0, -1, :].float()
    first_lp = torch.log_softmax(mask_padded_vocab(last, vocab_size), dim=-1)
    first = [float(first_lp[t[0]].item()) for t in plan.targets]

    group_size = min(cache.batch_size, max(len(plan.targets), 1))
    _copy_prefix_rows(cache, group_size, prefix)

    rest: list[list[float]] = [[] for _ in plan.targets]
    for group in chunks(range(len(plan.targets)), group_size):
        widths = [plan.input_lengths[i] for i in group]
        if max(widths) == 0:
            continue
        batch = [plan.inputs[i] + [pad_id] * (max(widths) - len(plan.inputs[i])) for i in group]
        cache.current_seq_len = prefix
        logits = model.forward(torch.tensor(batch, dtype=torch.long), cache)
        for row, i in enumerate(group):
            n = plan.input_lengths[i]
            if n == 0:
                continue
            lp = torch.log_softmax(
                mask_padded_vocab(logits[row, :n, :].float(), vocab_size), dim=-1
            )
            wanted = torch.tensor(plan.targets[i][1:], dtype=torch.long, device=lp.device)
            rest[i] = lp.gather(-1, wanted.view(-1, 1)).view(-1).tolist()
    cache.current_seq_len = 0
    return sum_candidate_logprobs(first, rest)

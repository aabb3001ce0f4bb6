"""Pure batch assembly: which requests share a static batch, padding, masks, scoring rows, stops."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from consumer.engine.base import FinishReason

# Additive attention bias for padding. Finite on purpose: a padded query row whose keys are all
# masked must still softmax to numbers (an all -inf row gives NaN, and NaN in a pad position's
# K/V would poison every row through the next layer's attention). exp(-30000) is 0 in FP16 and
# FP32 alike, and -30000 plus any realistic attention score stays inside FP16's range.
PAD_BIAS = -30000.0

# exllamav2's dynamic generator's eos_reason values, as finish reasons.
EOS_REASONS: dict[str, FinishReason] = {
    "stop_token": "stop",
    "stop_string": "stop",
    "end_filter": "stop",
    "max_new_tokens": "length",
}


@dataclass(frozen=True, slots=True)
class QueuedShape:
    """The two numbers batch planning needs from a waiting generate request."""

    prompt_tokens: int
    max_new_tokens: int


def plan_static_batch(
    queue: Sequence[QueuedShape], *, max_batch_size: int, max_seq_len: int
) -> list[int]:
    """Indices (oldest first) of the requests to run together in the next static batch.

    Every row of a static batch is left-padded to the longest prompt and decoded until the
    largest max_new_tokens, so a request joins only if that padded length still fits a cache
    row. The oldest request always runs (each request was checked to fit alone).
    """
    chosen: list[int] = []
    longest_prompt = 0
    longest_output = 0
    for index, item in enumerate(queue):
        if len(chosen) == max_batch_size:
            break
        prompt = max(longest_prompt, item.prompt_tokens)
        output = max(longest_output, item.max_new_tokens)
        if chosen and prompt + output > max_seq_len:
            continue
        chosen.append(index)
        longest_prompt, longest_output = prompt, output
    return chosen


@dataclass(frozen=True, slots=True)
class PaddedBatch:
    """Left-padded prompts: every row ends at the same column so decoding stays in lockstep."""

    ids: list[list[int]]
    pad_lengths: list[int]

    @property
    def width(self) -> int:
        return len(self.ids[0]) if self.ids else 0

    @property
    def position_offsets(self) -> list[int]:
        """RoPE offsets that make each row's first real token position 0."""
        return [-p for p in self.pad_lengths]

    def attention_bias(self) -> list[list[float]]:
        """Additive mask (batch x width): PAD_BIAS over padding, 0 over real tokens."""
        return [[PAD_BIAS] * p + [0.0] * (self.width - p) for p in self.pad_lengths]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> PaddedBatch:
    """Pad token-id rows on the left to the longest row."""
    if not rows:
        raise ValueError("cannot pad an empty batch")
    if any(len(r) == 0 for r in rows):
        raise ValueError("cannot pad an empty prompt")
    width = max(len(r) for r in rows)
    pads = [width - len(r) for r in rows]
    return PaddedBatch(
        ids=[[pad_id] * p + list(r) for p, r in zip(pads, rows, strict=True)], pad_lengths=pads
    )


@dataclass(frozen=True, slots=True)
class ScoringPlan:
    """How to score candidates after a shared prompt with one cached prefix.

    The prompt runs once; its last position predicts each candidate's first target. Then every
    candidate's own tokens run as one right-padded batch on top of a copy of that prefix, and
    position k of row j predicts target k+1 of candidate j. Right padding needs no mask: causal
    attention never lets a real position see the padding after it.
    """

    prompt_ids: list[int]
    targets: list[list[int]]
    inputs: list[list[int]]

    @property
    def input_lengths(self) -> list[int]:
        return [len(r) for r in self.inputs]

    def padded_inputs(self, pad_id: int) -> list[list[int]]:
        """Candidate inputs right-padded to the longest (at least one column)."""
        width = max([1, *self.input_lengths])
        return [list(r) + [pad_id] * (width - len(r)) for r in self.inputs]


def plan_scoring(
    prompt_ids: Sequence[int], candidates: Sequence[Sequence[int]], end_of_turn_id: int
) -> ScoringPlan:
    """Targets are each candidate's tokens followed by the end-of-turn token."""
    if not prompt_ids:
        raise ValueError("scoring needs a non-empty prompt")
    targets = [[*c, end_of_turn_id] for c in candidates]
    return ScoringPlan(
        prompt_ids=list(prompt_ids), targets=targets, inputs=[list(t[:-1]) for t in targets]
    )


def sum_candidate_logprobs(
    first_target_logprobs: Sequence[float], continuation_logprobs: Sequence[Sequence[float]]
) -> tuple[float, ...]:
    """Each candidate's total: log p(first target | prompt) + sum over its later targets."""
    if len(first_target_logprobs) != len(continuation_logprobs):
        raise ValueError("one first-target logprob per candidate")
    return tuple(
        float(first) + float(sum(rest))
        for first, rest in zip(first_target_logprobs, continuation_logprobs, strict=True)
    )


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def streamable(text: str, stops: Sequence[str]) -> int:
    """How much of `text` may be shown while generation goes on: all of it but a trailing
    incomplete character (decoded as U+FFFD) and the longest tail that may begin a stop
    string (exllamav2's dynamic generator holds the same text back)."""
    safe = len(text.rstrip("\ufffd"))
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, safe), held, -1):
            if text.endswith(stop[:size], 0, safe):
                held = size
                break
    return safe - held


def chunks(items: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive groups of at most `size` items."""
    if size < 1:
        raise ValueError("size must be positive")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished generation: its text, why it ended, and the tokens charged for it."""

    text: str
    reason: FinishReason
    output_tokens: int


def paged_completion(result: Mapping[str, Any], decode: Callable[[list[int]], str]) -> Completion:
    """A paged job's final result, counted and cut the way a static batch row is.

    Both modes leave a stop token out of the text and out of `output_tokens` (as llama.cpp
    does), and return all text generated before it. In exllamav2 0.3.2's final result
    (`ExLlamaV2DynamicJob.receive_sample`, `emit(..., emit_eos=True)`), a stop token ends the
    job without `emit_held`: `new_tokens` counts the stop token, and `full_completion` lacks
    the text still held back (a partial stop string, half a UTF-8 character), which sits with
    the stop token in `result["held"]`. Other endings emit the held text first.
    """
    eos_reason = str(result.get("eos_reason"))
    text = str(result.get("full_completion") or "")
    output_tokens = int(result.get("new_tokens") or 0)
    if eos_reason == "stop_token":
        held = result.get("held") or {}
        raw = held.get("token_ids")
        held_ids = [] if raw is None else [int(t) for t in _flat(raw)]
        text += decode(held_ids[:-1]) if len(held_ids) > 1 else ""
        output_tokens -= 1
    return Completion(
        text=text, reason=EOS_REASONS.get(eos_reason, "stop"), output_tokens=max(output_tokens, 0)
    )


def _flat(ids: Any) -> list[Any]:
    """Token ids from a (1, n) tensor, an array or a list."""
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    while values and isinstance(values[0], list):
        values = [v for row in values for v in row]
    return values

"""Static batch planning, padding/masks, scoring plans and stop strings (pure, no torch)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.engine.exllamav2.batching import (
    PAD_BIAS,
    QueuedShape,
    chunks,
    find_stop,
    left_pad,
    plan_scoring,
    plan_static_batch,
    sum_candidate_logprobs,
)


def test_left_pad_aligns_prompt_ends_and_offsets_start_real_tokens_at_zero() -> None:
    batch = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert batch.ids == [[5, 6, 7], [0, 0, 8]]
    assert batch.pad_lengths == [0, 2]
    assert batch.position_offsets == [0, -2]
    assert batch.attention_bias() == [[0.0, 0.0, 0.0], [PAD_BIAS, PAD_BIAS, 0.0]]


def test_pad_bias_is_finite_and_fits_fp16_with_attention_scores() -> None:
    assert math.isfinite(PAD_BIAS)
    # An FP16 score near the bias must not overflow to -inf (65504 is FP16's max).
    assert PAD_BIAS - 1000.0 > -65504.0
    assert math.exp(PAD_BIAS) == 0.0


@given(st.lists(st.lists(st.integers(1, 1000), min_size=1, max_size=12), min_size=1, max_size=8))
def test_left_pad_keeps_every_prompt_intact(rows: list[list[int]]) -> None:
    batch = left_pad(rows, pad_id=0)
    width = max(len(r) for r in rows)
    for row, padded, pad, bias in zip(
        rows, batch.ids, batch.pad_lengths, batch.attention_bias(), strict=True
    ):
        assert len(padded) == width == len(bias)
        assert padded[pad:] == row
        assert bias.count(PAD_BIAS) == pad
        assert all(b == 0.0 for b in bias[pad:])


def test_left_pad_rejects_empty_input() -> None:
    with pytest.raises(ValueError):
        left_pad([], pad_id=0)
    with pytest.raises(ValueError):
        left_pad([[1], []], pad_id=0)


def test_static_batch_takes_the_oldest_first_up_to_max_batch_size() -> None:
    queue = [QueuedShape(10, 10) for _ in range(5)]
    assert plan_static_batch(queue, max_batch_size=3, max_seq_len=100) == [0, 1, 2]


def test_static_batch_skips_requests_whose_padding_would_overflow_a_row() -> None:
    queue = [QueuedShape(50, 40), QueuedShape(80, 10), QueuedShape(20, 30)]
    # 0 + 1 would need max prompt 80 + max output 40 = 120 > 100; 0 + 2 needs 50 + 40.
    assert plan_static_batch(queue, max_batch_size=8, max_seq_len=100) == [0, 2]


def test_static_batch_always_runs_the_oldest_request() -> None:
    queue = [QueuedShape(90, 10), QueuedShape(5, 5)]
    assert plan_static_batch(queue, max_batch_size=1, max_seq_len=100) == [0]


@given(
    st.lists(st.tuples(st.integers(1, 60), st.integers(1, 40)), min_size=1, max_size=20),
    st.integers(1, 8),
)
def test_planned_batches_always_fit_a_cache_row(pairs: list[tuple[int, int]], size: int) -> None:
    queue = [QueuedShape(p, n) for p, n in pairs]
    picks = plan_static_batch(queue, max_batch_size=size, max_seq_len=100)
    assert picks[0] == 0
    assert len(picks) <= size
    assert picks == sorted(set(picks))
    chosen = [queue[i] for i in picks]
    assert max(c.prompt_tokens for c in chosen) + max(c.max_new_tokens for c in chosen) <= 100


def test_scoring_targets_are_candidate_tokens_then_end_of_turn() -> None:
    plan = plan_scoring([1, 2, 3], [[10], [10, 11]], end_of_turn_id=99)
    assert plan.targets == [[10, 99], [10, 11, 99]]
    # The prompt's last position predicts target 0; the candidate's own tokens predict the rest.
    assert plan.inputs == [[10], [10, 11]]
    assert plan.padded_inputs(pad_id=0) == [[10, 0], [10, 11]]


def test_a_label_that_prefixes_another_is_scored_on_different_targets() -> None:
    # "pos" vs "positive": the shorter label must pay for the end-of-turn after its last token.
    plan = plan_scoring([1], [[7], [7, 8]], end_of_turn_id=99)
    assert plan.targets[0][-1] == 99
    assert plan.targets[1][1] == 8


def test_empty_candidate_scores_only_the_end_of_turn() -> None:
    plan = plan_scoring([1], [[]], end_of_turn_id=99)
    assert plan.targets == [[99]]
    assert plan.inputs == [[]]
    assert plan.padded_inputs(pad_id=0) == [[0]]


def test_scoring_needs_a_prompt() -> None:
    with pytest.raises(ValueError):
        plan_scoring([], [[1]], end_of_turn_id=2)


def test_candidate_logprob_is_the_sum_over_all_targets() -> None:
    totals = sum_candidate_logprobs([-1.0, -0.5], [[-0.25], [-2.0, -0.125]])
    assert totals == (-1.25, -2.625)


def test_candidate_logprob_lengths_must_match() -> None:
    with pytest.raises(ValueError):
        sum_candidate_logprobs([-1.0], [[], []])


def test_find_stop_returns_the_earliest_stop() -> None:
    assert find_stop("abc END xyz STOP", ["STOP", "END"]) == 4
    assert find_stop("nothing here", ["STOP"]) is None
    assert find_stop("anything", ["", "zz"]) is None


def test_chunks_split_in_order() -> None:
    assert chunks(range(5), 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        chunks([1], 0)

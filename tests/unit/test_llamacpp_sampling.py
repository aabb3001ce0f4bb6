"""Choosing tokens: greedy at temperature 0, seeded temperature + top-p otherwise; scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest

from consumer.engine.llamacpp.sampling import (
    Sampler,
    derive_seed,
    greedy,
    nucleus,
    token_logprob,
)

# Probabilities 0.5, 0.3, 0.15, 0.05.
LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))


def draws(sampler: Sampler, n: int = 400) -> list[int]:
    return [sampler(LOGITS) for _ in range(n)]


def test_greedy_is_the_argmax_lowest_id_on_ties() -> None:
    assert greedy(np.array([0.1, 3.0, -2.0, 3.0], dtype=np.float32)) == 1


def test_temperature_zero_or_below_is_greedy_and_draws_nothing() -> None:
    for temperature in (0.0, -1.0):
        sampler = Sampler(temperature=temperature, top_p=0.5, seed=1)
        state = sampler.rng.bit_generator.state
        assert draws(sampler, 5) == [0] * 5
        assert sampler.rng.bit_generator.state == state


def test_the_same_seed_draws_the_same_tokens() -> None:
    first = draws(Sampler(temperature=0.8, top_p=0.95, seed=42))
    again = draws(Sampler(temperature=0.8, top_p=0.95, seed=42))
    other = draws(Sampler(temperature=0.8, top_p=0.95, seed=43))
    assert first == again
    assert first != other


def test_top_p_keeps_the_smallest_set_that_reaches_it() -> None:
    rng = np.random.default_rng(0)
    # 0.5 < 0.6 <= 0.5 + 0.3: the two most likely tokens only.
    drawn = {nucleus(LOGITS, temperature=1.0, top_p=0.6, rng=rng) for _ in range(500)}
    assert drawn == {0, 1}
    drawn = {nucleus(LOGITS, temperature=1.0, top_p=0.01, rng=rng) for _ in range(50)}
    assert drawn == {0}


def test_without_top_p_every_token_is_drawn_in_proportion() -> None:
    rng = np.random.default_rng(7)
    counts = np.bincount(
        [nucleus(LOGITS, temperature=1.0, top_p=1.0, rng=rng) for _ in range(4000)], minlength=4
    )
    assert np.allclose(counts / counts.sum(), [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_low_temperature_sharpens_and_high_flattens() -> None:
    rng = np.random.default_rng(3)
    cold = [nucleus(LOGITS, temperature=0.05, top_p=1.0, rng=rng) for _ in range(200)]
    hot = [nucleus(LOGITS, temperature=5.0, top_p=1.0, rng=rng) for _ in range(2000)]
    assert set(cold) == {0}
    assert np.bincount(hot, minlength=4)[3] > 300  # ~0.18 of the draws at T=5


def test_derived_seeds_are_stable_and_distinct() -> None:
    seeds = [derive_seed(0, n) for n in range(100)]
    assert len(set(seeds)) == 100
    assert seeds == [derive_seed(0, n) for n in range(100)]
    assert derive_seed(1, 0) != derive_seed(0, 0)
    assert derive_seed(-5, 2) >= 0


def test_token_logprob_is_the_log_softmax_in_float64() -> None:
    logits = np.array([2.0, -1.0, 0.5, 30.0], dtype=np.float32)
    total = sum(math.exp(x) for x in logits.astype(np.float64))
    for token, value in enumerate(logits):
        assert token_logprob(logits, token) == pytest.approx(
            float(value) - math.log(total), abs=1e-12
        )

"""Choosing llama.cpp's thread count by measurement (pure: costs are scripted)."""

from __future__ import annotations

from collections.abc import Callable

from consumer.engine.llamacpp.threads import ThreadTuner, thread_choices


def run(tuner: ThreadTuner, steps: int, cost: Callable[[int], float]) -> list[int]:
    """Feed `steps` decodes of 4 tokens costing `cost(threads)` seconds per token; the
    thread count each step ran with."""
    used = []
    threads = tuner.current
    for _ in range(steps):
        used.append(threads)
        threads = tuner.observe(cost(threads) * 4, 4)
    return used


def test_choices_are_every_core_one_fewer_and_half() -> None:
    assert thread_choices(1) == (1,)
    assert thread_choices(2) == (2, 1)
    assert thread_choices(16) == (16, 15, 8)


def test_on_a_quiet_cpu_every_core_stays_the_choice() -> None:
    tuner = ThreadTuner((2, 1), probe_every=20, probe_steps=4)
    used = run(tuner, 500, {2: 1.0, 1: 1.35}.__getitem__)
    assert tuner.current == 2 and tuner.switches == 0
    # Probing costs a few steps in every probe_every + probe_steps.
    assert used.count(1) / len(used) < 0.2


def test_a_busy_neighbour_moves_it_to_fewer_threads_and_back_when_it_leaves() -> None:
    tuner = ThreadTuner((2, 1), probe_every=20, probe_steps=4)
    busy = {2: 10.0, 1: 1.8}  # threads spinning at barriers behind a descheduled one
    run(tuner, 60, busy.__getitem__)
    assert tuner.current == 1
    used = run(tuner, 200, busy.__getitem__)
    assert used.count(1) / len(used) > 0.8
    run(tuner, 60, {2: 1.0, 1: 1.35}.__getitem__)
    assert tuner.current == 2 and tuner.switches == 2


def test_a_small_difference_is_not_worth_a_switch() -> None:
    tuner = ThreadTuner((2, 1), probe_every=10, probe_steps=4, margin=0.1)
    run(tuner, 200, {2: 1.0, 1: 0.95}.__getitem__)
    assert tuner.current == 2


def test_the_first_step_of_a_trial_is_not_measured() -> None:
    tuner = ThreadTuner((2, 1), probe_every=5, probe_steps=3)
    run(tuner, 5, lambda threads: 1.0)
    assert tuner.trying == 1
    tuner.observe(1000.0, 1)  # the new thread team's warm-up
    tuner.observe(0.5, 1)
    assert tuner.observe(0.5, 1) == 1 and tuner.current == 1


def test_a_configured_count_is_never_changed() -> None:
    tuner = ThreadTuner((3,), probe_every=1, probe_steps=1)
    assert run(tuner, 50, lambda threads: 1.0) == [3] * 50

"""How many threads llama.cpp decodes with: chosen by measuring, so a shared CPU degrades in
proportion instead of collapsing.

ggml's threads meet at a barrier after every operation of the graph (hundreds per token) and
spin there. With one thread per core, a process busy on one of the cores (the broker, a
sidecar, another service) deschedules one decode thread for whole time slices while the
others spin at the barrier: measured here on 2 cores with a busy loop on one, 2 threads fell
to 0.09-0.23x of their quiet tokens/s while 1 thread kept 0.54x. No fixed count is right for
both a quiet and a shared box, so `ThreadTuner` keeps the count that measures fastest: it
runs on the current count, now and then tries each other candidate for a few steps, and
switches when one is clearly cheaper per token. Pure: no clock, no llama.cpp; the backend
feeds it each step's seconds and tokens.
"""

from __future__ import annotations

import statistics
from collections import deque


def thread_choices(cores: int) -> tuple[int, ...]:
    """The counts worth trying on `cores` cores, every core first: all, one fewer (a
    neighbour busy on one core), half (a busy box)."""
    return tuple(sorted({max(1, cores), max(1, cores - 1), max(1, cores // 2)}, reverse=True))


class ThreadTuner:
    """Tells the backend how many threads the next step should use.

    `observe(seconds, tokens)` after every decode returns the count for the next one. Every
    `probe_every` steps on the current count, each other candidate runs `probe_steps` steps
    (the first of them not measured: a new thread team warms up); a candidate whose median
    seconds per token is below the current's recent median by more than `margin` becomes
    the current one.
    """

    def __init__(
        self,
        choices: tuple[int, ...],
        *,
        probe_every: int = 100,
        probe_steps: int = 6,
        margin: float = 0.1,
    ) -> None:
        if not choices:
            raise ValueError("no thread counts to choose from")
        self.choices = choices
        self.current = choices[0]
        self.switches = 0
        self._probe_every = probe_every
        self._probe_steps = probe_steps
        self._margin = margin
        self._recent: deque[float] = deque(maxlen=probe_steps)  # the current's cost per token
        self._since_probe = 0
        self._probing: list[int] = []  # candidates still to try in this round
        self._trial: list[float] = []
        self._best: tuple[float, int] | None = None  # (median cost, count) found this round

    @property
    def adaptive(self) -> bool:
        return len(self.choices) > 1

    @property
    def trying(self) -> int | None:
        """The candidate being measured now, or None while running on the current count."""
        return self._probing[0] if self._probing else None

    def observe(self, seconds: float, tokens: int) -> int:
        """One decode of `tokens` tokens took `seconds`; the thread count for the next one."""
        if not self.adaptive or tokens <= 0:
            return self.trying or self.current
        cost = seconds / tokens
        if self._probing:
            return self._measure_trial(cost)
        self._recent.append(cost)
        self._since_probe += 1
        if self._since_probe >= self._probe_every and len(self._recent) == self._recent.maxlen:
            self._since_probe = 0
            self._probing = [c for c in self.choices if c != self.current]
            self._trial = []
            self._best = (statistics.median(self._recent), self.current)
            return self._probing[0]
        return self.current

    def _measure_trial(self, cost: float) -> int:
        self._trial.append(cost)
        if len(self._trial) < self._probe_steps:
            return self._probing[0]
        candidate = self._probing.pop(0)
        median = statistics.median(self._trial[1:])
        assert self._best is not None
        if median < self._best[0] * (1 - self._margin):
            self._best = (median, candidate)
        self._trial = []
        if self._probing:
            return self._probing[0]
        chosen = self._best[1]
        if chosen != self.current:
            self.current = chosen
            self.switches += 1
            self._recent.clear()
        return self.current

"""Which requests this instance is serving, by tenant + request id, and cancels asked of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Stage = Literal["before_engine", "in_engine", "after_engine"]


@dataclass(eq=False)
class Serving:
    """One request between authentication and its reply."""

    stage: Stage = "before_engine"
    cancel_requested: bool = False


class ServingRequests:
    """The requests being served, so a cancel can reach one before it reaches the engine.

    A request registers right after authentication — synchronously, so a cancel record
    that follows it on the partition always finds it — and leaves when it is answered.
    """

    def __init__(self) -> None:
        self._serving: dict[str, Serving] = {}

    def open(self, key: str) -> Serving:
        serving = Serving()
        self._serving[key] = serving
        return serving

    def close(self, key: str, serving: Serving) -> None:
        if self._serving.get(key) is serving:
            del self._serving[key]

    def find(self, key: str) -> Serving | None:
        return self._serving.get(key)

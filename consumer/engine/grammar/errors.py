"""Why constrained decoding could not run: a schema the grammar engine refuses."""

from __future__ import annotations

from consumer.engine.base import EngineError


class GrammarRefused(EngineError):
    """The grammar engine cannot compile the request's schema (unsatisfiable, too complex);
    the request's fault, answered `validation`."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)

"""Which operation serves a request: every operation of the contract, found by name."""

from __future__ import annotations

from consumer.operations.base import AnyRequest, Operation
from consumer.operations.chat import Chat
from consumer.operations.classify import Classify
from consumer.operations.extract import Extract
from consumer.operations.summarize import Summarize
from consumer.operations.translate import Translate

OPERATIONS_BY_NAME: dict[str, Operation] = {
    op.name: op for op in (Summarize(), Translate(), Classify(), Chat(), Extract())
}


def operation_of(request: AnyRequest) -> Operation:
    """The operation that serves `request`."""
    return OPERATIONS_BY_NAME[request.operation]

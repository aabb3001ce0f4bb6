"""What the AsyncAPI document says of each topic, and the document FastStream makes of a broker."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from faststream.kafka import KafkaBroker


@dataclass(frozen=True, slots=True)
class TopicDoc:
    """A channel's title and description in the AsyncAPI document."""

    title: str
    description: str


REQUESTS = TopicDoc(
    title="operation requests",
    description=(
        "Operation requests keyed by tenant_id. Headers: correlation_id, reply_to "
        "(default ops.replies.v1), traceparent, x-opstream-key-id/-timestamp/-signature. "
        "Body: OperationRequest, or CancelRequest (operation 'cancel')."
    ),
)
REPLIES = TopicDoc(
    title="operation replies",
    description="Replies matched by the correlation_id header (or the request's reply_to). "
    "A request with stream=true first gets StreamChunk records (status 'chunk', header "
    "x-opstream-chunk-seq), then its OperationReply.",
)
DEAD_LETTERS = TopicDoc(
    title="dead letters",
    description="Undecodable or unroutable requests, with x-opstream-dlq-* origin headers.",
)


def asyncapi_document(broker: KafkaBroker) -> dict[str, Any]:
    """The AsyncAPI document FastStream generates for `broker` (no connection is made)."""
    from faststream.specification import AsyncAPI

    spec = AsyncAPI(broker, title="opstream", version="1.0.0")
    return json.loads(spec.to_specification().to_json())

"""The console's one line per finished request, for a person watching `opstream dev`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consumer.pipeline.outcome import Outcome

log = logging.getLogger(__name__)


def log_request_finished(outcome: Outcome) -> None:
    """One console line per answered, rejected or dead-lettered request (never its text)."""
    if not outcome.leaves_usage_row:
        return  # forwarded or a repeat: the record that answers it logs the line
    ending = outcome.ending
    fields: dict[str, Any] = {
        "tenant": outcome.tenant_id,
        "operation": outcome.operation,
        "status": ending.status,
    }
    if ending.code is not None:
        fields["code"] = ending.code
    fields["input_tokens"] = outcome.input_tokens
    fields["output_tokens"] = outcome.output_tokens
    # As the usage row and reply meta count it: from the fetch to the reply.
    fields["total_ms"] = round(outcome.stages.total_ms)
    log.log(
        logging.INFO if ending.status == "ok" else logging.WARNING,
        "request_finished",
        extra=fields,
    )

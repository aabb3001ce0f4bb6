"""The processing topology: one record in, one reply / dead letter / forwarded copy out.

Names are imported from their modules on first use (PEP 562), so importing the package
stays cheap.
"""

from __future__ import annotations

from consumer.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "BrokerUnavailable": "consumer.pipeline.outcome",
    "Outcome": "consumer.pipeline.outcome",
    "RecordPublisher": "consumer.pipeline.outcome",
    "RequestProcessor": "consumer.pipeline.processor",
    "route_record": "consumer.pipeline.routing",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

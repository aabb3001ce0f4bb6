"""Records from fetch to commit: flow control, offset bookkeeping, partition ownership.

Names are imported from their modules on first use (PEP 562), so importing the package
stays cheap.
"""

from __future__ import annotations

from consumer.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "GroupOffsets": "consumer.intake.assignment",
    "Intake": "consumer.intake.flow",
    "OffsetTracker": "consumer.intake.offsets",
    "PartitionOwner": "consumer.intake.assignment",
    "in_flight_bound": "consumer.intake.sizing",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

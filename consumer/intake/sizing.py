"""How many records the intake takes from Kafka before it stops fetching."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from consumer.engine.scheduler.policy import Load


def in_flight_bound(configured: int | None, load: Load) -> int:
    """`intake.max_in_flight` (`configured`), or twice what the engine's scheduler holds.

    Up to slots + queue records wait in the scheduler, ordered fairly between tenants; the
    intake takes as many again, which the full queue answers `overloaded` at once (retryable,
    not charged), so a flood learns it is one instead of waiting unseen; past the bound the
    fetch stops and the rest waits in Kafka. A revoke or shutdown hands every record whose
    work has not started back to Kafka at once and waits only for running work (`Intake`),
    so a deep queue never holds a drain beyond the grace.
    """
    if configured is not None:
        return configured
    return max(1, 2 * (load.slots + load.queue_limit))

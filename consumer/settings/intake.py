"""The intake section: how much work is in flight and how offsets are committed."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class IntakeSettings(BaseModel):
    """How much work is in flight and how offsets are committed."""

    model_config = ConfigDict(extra="forbid")

    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="Records taken from Kafka and not yet finished. Unset: what the engine's "
        "scheduler can hold (its slots + its queue).",
    )
    commit_interval_ms: int = Field(default=50, ge=1, le=60_000)
    shutdown_grace_s: float = Field(default=30.0, ge=0)

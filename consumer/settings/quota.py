"""Quota settings: default daily limits, the day's time zone, topics and the admin key."""

from __future__ import annotations

from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator


def _unlimited_as_none(value: Any) -> Any:
    # Environment variables cannot say `null`; let them say "unlimited".
    if isinstance(value, str) and value.strip().lower() in ("unlimited", "none", "null", ""):
        return None
    return value


Cap = Annotated[Annotated[int, Field(ge=0)] | None, BeforeValidator(_unlimited_as_none)]
"""A daily limit in settings: a count, or None / "unlimited"."""


class DailyLimitSettings(BaseModel):
    """Default daily limits of one operation (overrides `default_daily_*` for it)."""

    model_config = ConfigDict(extra="forbid")

    requests: Cap = None
    tokens: Cap = None


class QuotaSettings(BaseModel):
    """How daily quotas are enforced; nested as `Settings.quota` (env OPSTREAM_QUOTA__...)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    timezone: str = Field(default="UTC", description="IANA zone whose midnight starts a day.")
    default_daily_requests: Cap = Field(
        default=1000, description="Requests per tenant, per operation, per day (original: 1000)."
    )
    default_daily_tokens: Cap = Field(
        default=None, description="Input+output tokens per tenant, per operation, per day."
    )
    operation_defaults: dict[str, DailyLimitSettings] = Field(
        default_factory=dict,
        description="Per-operation defaults; a field left unset uses default_daily_*.",
    )
    total_daily_requests: Cap = Field(
        default=None, description="Requests per tenant per day over all operations."
    )
    total_daily_tokens: Cap = Field(
        default=None, description="Tokens per tenant per day over all operations."
    )
    state_topic: str = "ops.quota.state.v1"
    control_topic: str = "ops.control.v1"
    state_retention_ms: int = Field(
        default=3 * 24 * 3600 * 1000,
        ge=2 * 24 * 3600 * 1000,
        description="retention.ms of the state topic; must outlive a day plus the zone offset.",
    )
    restore_timeout_s: float = Field(default=60.0, gt=0)
    stored_answer_max_bytes: int = Field(
        default=16_384,
        ge=0,
        le=262_144,
        description="Largest final reply kept beside its charge for retries (0: none kept); "
        "a larger one is not kept, and a retry of it gets duplicate_request as before.",
    )
    clock_offset_s: float = Field(
        default=0.0,
        description="Seconds added to the wall clock for quota days. Tests only (to cross "
        "midnight in a running consumer's child process); keep 0 in production.",
    )
    admin_key: SecretStr | None = Field(
        default=None, description="Key for the admin HTTP API; unset disables the API."
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone: {value!r}") from exc
        return value

    def zone(self) -> ZoneInfo:
        """The time zone whose midnight rolls the quota day over."""
        return ZoneInfo(self.timezone)

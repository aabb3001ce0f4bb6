"""Wire models for daily quotas: control-topic commands, state-topic records, admin API bodies."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.requests import RequestId, TenantId

TOTAL = "*"
"""The operation name of the limit that counts every operation together."""
ALL_TENANTS = "*"
"""The tenant name of an override that applies to every tenant (below per-tenant overrides)."""
UNLIMITED = "unlimited"

Operation = Literal["summarize", "translate", "classify", "chat", "extract"]
QuotaScope = Literal["summarize", "translate", "classify", "chat", "extract", "*"]
LimitValue = Annotated[int, Field(ge=0, le=10**15)] | Literal["unlimited"]
"""A daily limit as written on the wire: a count (0 blocks everything) or "unlimited"."""

CONTROL_LIMITS_KEY = "quota.limits"
CONTROL_RESET_KEY = "quota.reset"
STATE_CHARGE_KEY = "quota.charge"


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ── control topic (compacted; key says what the value is the latest state of) ──


AnyTenant = TenantId | Literal["*"]
"""A tenant id, or "*" for the override every tenant inherits."""


class SetLimits(_Wire):
    """Override a tenant's (or every tenant's) daily limits for one operation or the total.

    A field left `null` is not overridden: the next layer down decides (every-tenant
    override, then settings). Key: `limits_key(tenant_id, operation)`; a tombstone on
    that key deletes the override.
    """

    kind: Literal["quota.set_limits"] = "quota.set_limits"
    v: Literal[1] = 1
    tenant_id: AnyTenant
    operation: QuotaScope
    daily_requests: LimitValue | None = None
    daily_tokens: LimitValue | None = None
    issued_at: datetime = Field(default_factory=_utc_now)
    issued_by: str | None = Field(default=None, max_length=200)


class ResetUsage(_Wire):
    """Start a tenant's counters for `day` again from zero. Key: `reset_key(tenant_id, day)`."""

    kind: Literal["quota.reset_usage"] = "quota.reset_usage"
    v: Literal[1] = 1
    tenant_id: TenantId
    day: date
    reset_id: str = Field(min_length=1, max_length=64)
    issued_at: datetime = Field(default_factory=_utc_now)
    issued_by: str | None = Field(default=None, max_length=200)


LimitCommand = Annotated[SetLimits | ResetUsage, Field(discriminator="kind")]
LIMIT_COMMAND_KINDS: frozenset[str] = frozenset({"quota.set_limits", "quota.reset_usage"})


def limits_key(tenant_id: str, operation: str) -> bytes:
    """The control-topic key whose latest value is the override of (tenant, operation)."""
    return json.dumps([CONTROL_LIMITS_KEY, tenant_id, operation]).encode()


def reset_key(tenant_id: str, day: date) -> bytes:
    """The control-topic key whose latest value is the latest reset of a tenant-day."""
    return json.dumps([CONTROL_RESET_KEY, tenant_id, day.isoformat()]).encode()


def parse_key(key: bytes | None) -> tuple[str, ...] | None:
    """A quota key as its parts, or None when the key is not one of ours."""
    if not key:
        return None
    try:
        parts = json.loads(key)
    except ValueError:
        return None
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
        return None
    if parts[0] not in (CONTROL_LIMITS_KEY, CONTROL_RESET_KEY, STATE_CHARGE_KEY):
        return None
    return tuple(parts)


# ── state topic (compacted + time-retained, co-partitioned with the request topic) ──


STORED_ANSWER_MAX_CHARS = 262_144
"""The most a stored answer may hold on the wire (the setting caps it lower)."""


class QuotaCharge(_Wire):
    """What one request costs a tenant on one day: the changelog record of a charge.

    Rewritten under the same key when the charge is settled; the usage of a tenant-day
    is the sum over its charges in the tenant-day's current reset epoch.
    """

    v: Literal[1] = 1
    tenant_id: TenantId
    day: date
    request_id: RequestId
    operation: str = Field(min_length=1, max_length=64)
    tokens: int = Field(ge=0)
    settled: bool
    reset_epoch: str | None = None
    charged_at: datetime
    origin: str | None = Field(
        default=None, max_length=300, description="topic/partition/offset of the charged record"
    )
    fingerprint: str | None = Field(
        default=None, max_length=64, description="digest of the charged record (no text)"
    )
    outcome: str | None = Field(
        default=None, max_length=64, description='"ok" or the error code; null while running'
    )
    counted: bool = Field(
        default=True,
        description="false: it ended without running the model (deadline expired in the "
        "queue, overloaded, cancelled or failed before it started); it keeps its request id "
        "but counts no request and no tokens",
    )
    body_digest: str | None = Field(
        default=None,
        max_length=64,
        description="digest of the request's body alone (no text): a retry has the same one",
    )
    answer: str | None = Field(
        default=None,
        max_length=STORED_ANSWER_MAX_CHARS,
        description="the final reply as published (JSON), kept for retries; null while it "
        "runs, when it did not end for good, or when it was larger than the cap",
    )


def charge_key(tenant_id: str, day: date, request_id: str) -> bytes:
    """The state-topic key of one request's charge."""
    return json.dumps([STATE_CHARGE_KEY, day.isoformat(), tenant_id, request_id]).encode()


# ── admin HTTP API (the original platform's shapes plus `tenant_id`) ──


class OperationLimit(_Wire):
    """One row of GET /limits: the effective daily limits of a tenant for one operation."""

    tenant_id: str
    operation: str
    daily_limit: int | None = Field(description="Requests per day; null means unlimited.")
    daily_tokens: int | None = Field(description="Tokens per day; null means unlimited.")
    max_input_chars: int | None = None
    max_output_tokens: int | None = None


class LimitsResponse(_Wire):
    """Body of GET /limits and PUT /limits."""

    limits: list[OperationLimit]


class UpdateLimitRequest(_Wire):
    """Body of PUT /limits. An omitted field keeps its value; `null` falls back to the default."""

    operation: QuotaScope
    tenant_id: AnyTenant = ALL_TENANTS
    daily_limit: LimitValue | None = None
    daily_tokens: LimitValue | None = None


class OperationUsage(_Wire):
    """One row of GET /limits/usage: a tenant's usage of one operation today."""

    tenant_id: str
    operation: str
    date: str
    request_count: int
    total_tokens: int
    daily_limit: int | None
    remaining: int | None = Field(description="Requests left today; null means unlimited.")
    daily_tokens: int | None
    tokens_remaining: int | None
    resets_at: datetime


class UsageResponse(_Wire):
    """Body of GET /limits/usage."""

    usage: list[OperationUsage]
    generated_at: datetime = Field(default_factory=_utc_now)


class ErrorResponse(_Wire):
    """Body of every admin API error."""

    error: str
    detail: Any | None = None
    timestamp: datetime = Field(default_factory=_utc_now)

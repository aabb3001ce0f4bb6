"""Daily limits: settings and overrides, and which limit a request would break (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, tzinfo
from typing import Literal

from consumer.errors import QuotaExceeded
from consumer.quota.days import resets_at
from consumer.settings.quota import QuotaSettings
from schemas.quota import ALL_TENANTS, TOTAL, UNLIMITED

Metric = Literal["requests", "tokens"]
OverrideValue = int | Literal["unlimited"] | None
"""An override field: a count, "unlimited", or None for "not overridden at this layer"."""
Source = Literal["settings", "all-tenants", "tenant"]


def limit_defaults(settings: QuotaSettings) -> LimitDefaults:
    """The settings layer of the limit book."""
    per_operation = {
        name: DailyCap(
            requests=op.requests
            if "requests" in op.model_fields_set
            else settings.default_daily_requests,
            tokens=op.tokens if "tokens" in op.model_fields_set else settings.default_daily_tokens,
        )
        for name, op in settings.operation_defaults.items()
    }
    return LimitDefaults(
        operation=DailyCap(settings.default_daily_requests, settings.default_daily_tokens),
        per_operation=per_operation,
        total=DailyCap(settings.total_daily_requests, settings.total_daily_tokens),
    )


@dataclass(frozen=True, slots=True)
class DailyCap:
    """Resolved daily limits of one scope; None means unlimited."""

    requests: int | None
    tokens: int | None


@dataclass(frozen=True, slots=True)
class LimitDefaults:
    """The settings layer: a default per operation, exceptions per operation, and the total."""

    operation: DailyCap
    per_operation: Mapping[str, DailyCap] = field(default_factory=dict)
    total: DailyCap = DailyCap(None, None)

    def for_scope(self, scope: str) -> DailyCap:
        """The settings default of an operation, or of the total for `TOTAL`."""
        if scope == TOTAL:
            return self.total
        return self.per_operation.get(scope, self.operation)


@dataclass(frozen=True, slots=True)
class Override:
    """A control-topic override of one (tenant or every tenant, scope)."""

    requests: OverrideValue = None
    tokens: OverrideValue = None

    @property
    def is_empty(self) -> bool:
        """True when it overrides nothing (and can be deleted)."""
        return self.requests is None and self.tokens is None


def _as_cap(value: int | Literal["unlimited"]) -> int | None:
    return None if value == UNLIMITED else int(value)


class LimitBook:
    """Effective daily limits: settings < every-tenant override < tenant override; and resets.

    Filled by the control-topic follower; read by the ledger on every reservation.
    """

    def __init__(self, defaults: LimitDefaults) -> None:
        self.defaults = defaults
        self._overrides: dict[tuple[str, str], Override] = {}
        self._resets: dict[tuple[str, date], str] = {}

    def set_override(self, tenant_id: str, scope: str, override: Override) -> None:
        """Replace the override of (tenant, scope); an empty one deletes it."""
        if override.is_empty:
            self._overrides.pop((tenant_id, scope), None)
        else:
            self._overrides[(tenant_id, scope)] = override

    def delete_override(self, tenant_id: str, scope: str) -> None:
        """Fall back to the layers below for (tenant, scope)."""
        self._overrides.pop((tenant_id, scope), None)

    def override(self, tenant_id: str, scope: str) -> Override | None:
        """The override stored for exactly (tenant, scope), if any."""
        return self._overrides.get((tenant_id, scope))

    def overrides(self) -> dict[tuple[str, str], Override]:
        """Every stored override, by (tenant, scope)."""
        return dict(self._overrides)

    def set_reset(self, tenant_id: str, day: date, reset_id: str) -> None:
        """Record that the tenant's counters for `day` restart from zero under `reset_id`."""
        self._resets[(tenant_id, day)] = reset_id

    def reset_epoch(self, tenant_id: str, day: date) -> str | None:
        """The id of the latest reset of the tenant-day (None: never reset)."""
        return self._resets.get((tenant_id, day))

    def resolve_with_sources(
        self, tenant_id: str, scope: str
    ) -> tuple[DailyCap, tuple[Source, Source]]:
        """The effective limits of (tenant, scope) and which layer set each field."""
        base = self.defaults.for_scope(scope)
        requests, tokens = base.requests, base.tokens
        sources: list[Source] = ["settings", "settings"]
        layers: tuple[tuple[str, Source], ...] = ((ALL_TENANTS, "all-tenants"),)
        if tenant_id != ALL_TENANTS:
            layers += ((tenant_id, "tenant"),)
        for layer_tenant, source in layers:
            found = self._overrides.get((layer_tenant, scope))
            if found is None:
                continue
            if found.requests is not None:
                requests, sources[0] = _as_cap(found.requests), source
            if found.tokens is not None:
                tokens, sources[1] = _as_cap(found.tokens), source
        return DailyCap(requests, tokens), (sources[0], sources[1])

    def resolve(self, tenant_id: str, scope: str) -> DailyCap:
        """The effective daily limits of (tenant, scope)."""
        return self.resolve_with_sources(tenant_id, scope)[0]


class Keep:
    """Marker for "leave this field as it is" in partial limit updates."""

    _instance: Keep | None = None

    def __new__(cls) -> Keep:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "KEEP"


KEEP = Keep()


def merge_override(
    current: Override | None,
    *,
    requests: OverrideValue | Keep = None,
    tokens: OverrideValue | Keep = None,
) -> Override:
    """`current` with the given fields replaced; `KEEP` leaves a field as it is."""
    base = current or Override()
    return Override(
        requests=base.requests if isinstance(requests, Keep) else requests,
        tokens=base.tokens if isinstance(tokens, Keep) else tokens,
    )


@dataclass(slots=True)
class Usage:
    """Requests and tokens counted against a limit."""

    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class Trip:
    """The limit a reservation would break."""

    metric: Metric
    scope: str
    limit: int
    used: int
    requested: int

    @property
    def remaining(self) -> int:
        """How much of the limit is left (never negative)."""
        return max(0, self.limit - self.used)


def remaining(limit: int | None, used: int) -> int | None:
    """What is left of a limit; None when unlimited."""
    return None if limit is None else max(0, limit - used)


def first_trip(
    *,
    operation: str,
    operation_cap: DailyCap,
    operation_used: Usage,
    total_cap: DailyCap,
    total_used: Usage,
    tokens: int,
) -> Trip | None:
    """The first limit that one more request of `tokens` tokens would exceed, or None.

    Order: requests (operation, total), then tokens (operation, total).
    """
    checks: tuple[tuple[Metric, str, int | None, int, int], ...] = (
        ("requests", operation, operation_cap.requests, operation_used.requests, 1),
        ("requests", TOTAL, total_cap.requests, total_used.requests, 1),
        ("tokens", operation, operation_cap.tokens, operation_used.tokens, tokens),
        ("tokens", TOTAL, total_cap.tokens, total_used.tokens, tokens),
    )
    for metric, scope, limit, used, amount in checks:
        if limit is not None and used + amount > limit:
            return Trip(metric=metric, scope=scope, limit=limit, used=used, requested=amount)
    return None


def limit_name(scope: str, metric: Metric) -> str:
    """How a reply names a limit: "summarize.requests", "total.tokens"."""
    return f"{'total' if scope == TOTAL else scope}.{metric}"


def quota_exceeded(trip: Trip, *, day: date, tz: tzinfo) -> QuotaExceeded:
    """The error for a tripped limit; its details are exactly the reply's quota fields."""
    when = resets_at(day, tz)
    what = "all operations" if trip.scope == TOTAL else trip.scope
    return QuotaExceeded(
        f"daily {trip.metric} limit for {what} reached: {trip.used} of {trip.limit} used, "
        f"{trip.requested} more requested; resets at {when.isoformat()}",
        limit=trip.limit,
        used=trip.used,
        remaining=trip.remaining,
        resets_at=when,
        limit_name=limit_name(trip.scope, trip.metric),
    )

"""Per-tenant daily quotas: limits, partition-local counters backed by Kafka, admin commands.

Names are imported from their modules on first use (PEP 562), so importing the package
stays cheap for the CLI.
"""

from __future__ import annotations

from consumer.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "DailyCap": "consumer.quota.limit_book",
    "DailyLimitSettings": "consumer.settings.quota",
    "KEEP": "consumer.quota.limit_book",
    "LimitBook": "consumer.quota.limit_book",
    "LimitCommandPublisher": "consumer.quota.control",
    "LimitDefaults": "consumer.quota.limit_book",
    "LimitFollower": "consumer.quota.control",
    "LimitsAdminApi": "consumer.quota.admin",
    "Override": "consumer.quota.limit_book",
    "PartitionNotRestored": "consumer.quota.store",
    "QuotaLedger": "consumer.quota.ledger",
    "QuotaRuntime": "consumer.quota.runtime",
    "QuotaSettings": "consumer.settings.quota",
    "QuotaStore": "consumer.quota.store",
    "Reservation": "consumer.quota.ledger",
    "TenantUsage": "consumer.quota.store",
    "TopicUnavailable": "consumer.bus.topic_reader",
    "Usage": "consumer.quota.limit_book",
    "admin_routes": "consumer.quota.admin",
    "apply_control_record": "consumer.quota.control",
    "day_of": "consumer.quota.days",
    "load_limit_book": "consumer.quota.control",
    "make_state_producer": "consumer.quota.store",
    "merge_override": "consumer.quota.limit_book",
    "offset_clock": "consumer.quota.store",
    "partition_for_tenant": "consumer.quota.partitions",
    "resets_at": "consumer.quota.days",
    "utc_now": "consumer.quota.store",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

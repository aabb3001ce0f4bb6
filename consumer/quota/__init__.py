"""Per-tenant daily quotas: limits, partition-local counters backed by Kafka, admin commands."""

from consumer.bus.topic_reader import TopicUnavailable
from consumer.quota.admin import LimitsAdminApi, admin_routes
from consumer.quota.arithmetic import (
    KEEP,
    DailyCap,
    LimitBook,
    LimitDefaults,
    Override,
    QuotaLedger,
    Reservation,
    Usage,
    day_of,
    merge_override,
    partition_for_tenant,
    resets_at,
)
from consumer.quota.control import (
    LimitCommandPublisher,
    LimitFollower,
    apply_control_record,
    load_limit_book,
)
from consumer.quota.runtime import QuotaRuntime
from consumer.quota.store import (
    PartitionNotRestored,
    QuotaStore,
    TenantUsage,
    make_state_producer,
    offset_clock,
    utc_now,
)
from consumer.settings.quota import DailyLimitSettings, QuotaSettings

__all__ = [
    "KEEP",
    "DailyCap",
    "DailyLimitSettings",
    "LimitBook",
    "LimitCommandPublisher",
    "LimitDefaults",
    "LimitFollower",
    "LimitsAdminApi",
    "Override",
    "PartitionNotRestored",
    "QuotaLedger",
    "QuotaRuntime",
    "QuotaSettings",
    "QuotaStore",
    "Reservation",
    "TenantUsage",
    "TopicUnavailable",
    "Usage",
    "admin_routes",
    "apply_control_record",
    "day_of",
    "load_limit_book",
    "make_state_producer",
    "merge_override",
    "offset_clock",
    "partition_for_tenant",
    "resets_at",
    "utc_now",
]

"""Step 0 and 2: where a record belongs, and the checks a request passes before it runs
(pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from consumer.bus.records import InboundRecord
from consumer.engine.base import WorkTag
from consumer.errors import DeadlineExceeded, ValidationFailed
from consumer.operations.base import AnyRequest
from consumer.quota.partitions import partition_for_key, partition_for_tenant
from schemas.headers import FORWARDED_FROM
from schemas.replies import FieldError

_KEY_ERROR = FieldError(loc=["key"], msg="the record key must be the tenant_id", type="key")


def home_partition(record: InboundRecord, partitions: int) -> int | None:
    """The tenant's partition when `record` must move there first, else None.

    librdkafka clients (kcat, confluent-kafka, node-rdkafka) place keyed records with
    CRC32, Java with murmur2: a record on another partition than murmur2 of its key is
    forwarded there once (Kafka Streams' repartition step). A record forwarded already, or
    without a key, stays (and is refused by `check_placement`).
    """
    if not record.key or record.header(FORWARDED_FROM) is not None:
        return None
    home = partition_for_key(record.key, partitions)
    return None if home == record.partition else home


def check_placement(record: InboundRecord, request: AnyRequest, partitions: int) -> None:
    """The record is keyed by its tenant and sits on the tenant's partition, or
    ValidationFailed (quotas are counted per partition)."""
    if record.key != request.tenant_id.encode():
        problem = "has no key" if not record.key else "is keyed by another value"
        raise ValidationFailed(
            f"the record {problem}: key requests by their tenant_id, so that one "
            "partition counts each tenant's quota",
            errors=[_KEY_ERROR],
        )
    expected = partition_for_tenant(request.tenant_id, partitions)
    if record.partition != expected:
        # Only a record forwarded already gets here (see `home_partition`): the request
        # topic's partition count differs from `topics.request_partitions`.
        raise ValidationFailed(
            f"request for tenant {request.tenant_id!r} arrived on partition "
            f"{record.partition}, not {expected}, after being forwarded once: "
            "the request topic's partition count does not match the consumer's settings",
            errors=[_KEY_ERROR],
        )


def deadline_of(request: AnyRequest, produced_at_ms: int) -> datetime | None:
    """The earlier of the absolute `deadline` and `timeout_ms` after the record was produced."""
    candidates = []
    if request.deadline is not None:
        candidates.append(request.deadline.astimezone(UTC))
    if request.timeout_ms is not None:
        produced = datetime.fromtimestamp(produced_at_ms / 1000, UTC)
        candidates.append(produced + timedelta(milliseconds=request.timeout_ms))
    return min(candidates) if candidates else None


def check_deadline(request: AnyRequest, produced_at_ms: int, now: float) -> None:
    """DeadlineExceeded when the request's deadline has passed at `now` (unix seconds)."""
    deadline = deadline_of(request, produced_at_ms)
    if deadline is None:
        return
    moment = datetime.fromtimestamp(now, UTC)
    if moment >= deadline:
        late_ms = int((moment - deadline).total_seconds() * 1000)
        raise DeadlineExceeded(f"the deadline passed {late_ms} ms before the request could run")


def work_key(tenant_id: str, request_id: str) -> str:
    """What the engine's scheduler knows a request by (a cancel names the same two)."""
    return f"{tenant_id}\x00{request_id}"


def work_of(request: AnyRequest, request_id: str, produced_at_ms: int) -> WorkTag:
    """How the scheduler orders this request: tenant, priority, deadline, cancel key."""
    deadline = deadline_of(request, produced_at_ms)
    return WorkTag(
        tenant=request.tenant_id,
        priority=request.priority,
        deadline=deadline.timestamp() if deadline is not None else None,
        key=work_key(request.tenant_id, request_id),
    )

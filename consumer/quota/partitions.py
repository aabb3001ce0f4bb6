"""Where a tenant's requests belong: Java's default partitioner (murmur2) of the key (pure)."""

from __future__ import annotations

from aiokafka.partitioner import murmur2


def partition_for_tenant(tenant_id: str, partitions: int) -> int:
    """The tenant's request partition: Kafka's (Java's) default partitioner of its id.

    Counters are exact because each tenant's requests are served on this one partition;
    the consumer forwards a record placed elsewhere (another partitioner) here first.
    """
    return partition_for_key(tenant_id.encode(), partitions)


def partition_for_key(key: bytes, partitions: int) -> int:
    """Java's default partitioner (murmur2) of a record key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions

"""What exists on the bus: topic names, partition counts and configs."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

# Keep requests long enough to replay a day of traffic; replies only until clients read them.
REQUEST_RETENTION_MS = 7 * 24 * 3600 * 1000
REPLY_RETENTION_MS = 24 * 3600 * 1000
DLQ_RETENTION_MS = 30 * 24 * 3600 * 1000


class TopicSettings(BaseModel):
    """Names and sizes of the topics opstream owns."""

    model_config = ConfigDict(extra="forbid")

    requests: str = "ops.requests.v1"
    replies: str = "ops.replies.v1"
    dlq: str = "ops.requests.dlq.v1"
    request_partitions: int = Field(default=12, ge=1, le=1_000)
    reply_partitions: int = Field(default=12, ge=1, le=1_000)
    dlq_partitions: int = Field(default=3, ge=1, le=1_000)
    replication_factor: int = Field(default=1, ge=1, le=7)
    allowed_reply_topics: list[str] = Field(
        default_factory=lambda: ["ops.replies.*"],
        description="Glob patterns a request's reply_to must match.",
    )

    def reply_topic_allowed(self, topic: str) -> bool:
        """True when replies may be written to `topic` (never to our own input or DLQ)."""
        if topic in (self.requests, self.dlq):
            return False
        return any(fnmatch.fnmatchcase(topic, pattern) for pattern in self.allowed_reply_topics)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic as it should exist."""

    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)
    purpose: str = ""


def core_topics(settings: TopicSettings) -> list[TopicSpec]:
    """The request, reply and dead-letter topics."""
    rf = settings.replication_factor
    return [
        TopicSpec(
            settings.requests,
            settings.request_partitions,
            rf,
            {"cleanup.policy": "delete", "retention.ms": str(REQUEST_RETENTION_MS)},
            "operation requests, keyed by tenant_id",
        ),
        TopicSpec(
            settings.replies,
            settings.reply_partitions,
            rf,
            {"cleanup.policy": "delete", "retention.ms": str(REPLY_RETENTION_MS)},
            "default reply topic, matched by correlation_id",
        ),
        TopicSpec(
            settings.dlq,
            settings.dlq_partitions,
            rf,
            {"cleanup.policy": "delete", "retention.ms": str(DLQ_RETENTION_MS)},
            "records that could not be decoded or routed",
        ),
    ]


def quota_topics(
    settings: TopicSettings, *, state_topic: str, control_topic: str, state_retention_ms: int
) -> list[TopicSpec]:
    """The quota changelog (co-partitioned with requests) and the limit-command topic."""
    rf = settings.replication_factor
    return [
        TopicSpec(
            state_topic,
            settings.request_partitions,
            rf,
            {"cleanup.policy": "compact,delete", "retention.ms": str(state_retention_ms)},
            "quota counters, co-partitioned with the request topic",
        ),
        TopicSpec(
            control_topic,
            1,
            rf,
            {"cleanup.policy": "compact"},
            "limit commands, read in full by every instance",
        ),
    ]

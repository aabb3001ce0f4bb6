"""The Kafka header names of the contract: request-reply, signature, streaming, forwarding, DLQ."""

from __future__ import annotations

from dataclasses import dataclass

CORRELATION_ID = "correlation_id"
REPLY_TO = "reply_to"
CONTENT_TYPE = "content-type"
JSON = "application/json"

# The tenant signature (see `schemas.signing`).
KEY_ID_HEADER = "x-opstream-key-id"
TIMESTAMP_HEADER = "x-opstream-timestamp"
SIGNATURE_HEADER = "x-opstream-signature"
VERSION_HEADER = "x-opstream-signature-version"
SIGNATURE_HEADERS = (KEY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)

# Set on a record forwarded from the partition it was produced to to its tenant's
# partition ("topic/partition/offset" of the original); a record never moves twice.
FORWARDED_FROM = "x-opstream-forwarded-from"
# On a streamed reply's chunk records (not on the final reply): the chunk's number, from 1.
CHUNK_SEQ = "x-opstream-chunk-seq"
# On a reply that is the stored answer of an earlier record with the same request ("true").
REPLAYED = "x-opstream-replayed"

# Added to dead-lettered records so an operator can find and replay the original.
DLQ_ORIGIN_TOPIC = "x-opstream-dlq-origin-topic"
DLQ_ORIGIN_PARTITION = "x-opstream-dlq-origin-partition"
DLQ_ORIGIN_OFFSET = "x-opstream-dlq-origin-offset"
DLQ_REASON = "x-opstream-dlq-reason"
DLQ_INSTANCE = "x-opstream-dlq-instance"


@dataclass(frozen=True, slots=True)
class ReplyConvention:
    """The header names one request-reply convention uses."""

    name: str
    correlation: str
    reply_topic: str
    reply_partition: str | None


# Checked in this order; a request is answered in the first one whose correlation header it
# carries. Spring Kafka's ReplyingKafkaTemplate (KafkaHeaders) and SmallRye's
# KafkaRequestReply send the reply partition as a 4-byte big-endian int and match replies
# on the exact correlation bytes.
REPLY_CONVENTIONS: tuple[ReplyConvention, ...] = (
    ReplyConvention("opstream", CORRELATION_ID, REPLY_TO, None),
    ReplyConvention("spring", "kafka_correlationId", "kafka_replyTopic", "kafka_replyPartition"),
    ReplyConvention("smallrye", "REPLY_CORRELATION_ID", "REPLY_TOPIC", "REPLY_PARTITION"),
)

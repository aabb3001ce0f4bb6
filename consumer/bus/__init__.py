"""The Kafka edge: records as fetched, reply routes, the connection, publishing, reading topics.

Names are imported from their modules on first use (PEP 562), so importing the package
stays cheap.
"""

from __future__ import annotations

from consumer.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "InboundRecord": "consumer.bus.records",
    "KafkaConnection": "consumer.bus.connection",
    "KafkaRecordPublisher": "consumer.bus.publisher",
    "ReplyRoute": "consumer.bus.records",
    "TopicUnavailable": "consumer.bus.topic_reader",
    "UnreadableBatches": "consumer.bus.unreadable",
    "aiokafka_security_kwargs": "consumer.bus.security",
    "asyncapi_document": "consumer.bus.asyncapi",
    "faststream_security": "consumer.bus.security",
    "inbound_record": "consumer.bus.records",
    "read_to_end": "consumer.bus.topic_reader",
    "reply_route": "consumer.bus.records",
    "standalone_consumer": "consumer.bus.topic_reader",
    "start_local_broker": "consumer.bus.devbroker",
    "topic_partitions": "consumer.bus.topic_reader",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

"""What exists on the bus: topic names, partition counts and configs (`topics.catalog`), and
the idempotent bootstrap that creates them (`topics.ensure`, which needs a broker client)."""

from topics.catalog import TopicSettings, TopicSpec, core_topics

__all__ = ["TopicSettings", "TopicSpec", "core_topics"]
